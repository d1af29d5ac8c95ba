/*
 * The "enroll" and "renew" commands of the node daemons (ordinarynode,
 * supernode): one-shot clients of the login server that leave the node's
 * credentials in its state directory (login_client.h does the protocol).
 *
 *   ordinarynode -c on.json enroll --login https://login.example.org:8440 \
 *                --pin sha256:... --user alice [--password-file FILE]
 *   ordinarynode -c on.json renew
 */
#ifndef P2P_ENROLL_H
#define P2P_ENROLL_H

#include "cli.h"

/* In a node's state directory: the device name it enrolled as (docs/protocol.md 2.3). */
#define ENROLL_DEVICE_FILE "device"

/* The options both commands take, for the daemons' cli_command tables. */
extern const struct cli_option enroll_options[];
extern const struct cli_option renew_options[];

/* Runs "enroll": returns the exit status (0, 1 failure, 2 usage). */
int enroll_command(const struct cli_prog *prog, const struct cli_opts *o, const char *state_dir);
/* Runs "renew" with the credentials in state_dir: returns the exit status. */
int renew_command(const struct cli_prog *prog, const struct cli_opts *o, const char *state_dir);

#endif
