"""Stand-in for `ray.scripts.scripts` (the `ray` console script), enough of `ray start` to test the process
boundary: Ray's flags, joining the head's GCS, the node manager's listener, and `--block`; and with `--head`, the
GCS itself: it listens on `--node-ip-address`:`--port`, writes `standin ray: head listening`, and blocks until
SIGTERM (exit 0, `standin ray: stopped`).

What it does, in the order a worker's `ray start --block` does its part of it:
- writes one line, `standin ray: started {json}`, with its arguments and the variables sealbox is meant to set;
- connects to the head's GCS at `--address` (held open: the node is in the cluster while it lasts);
- listens on `--node-ip-address`:`--node-manager-port`, as the raylet does;
- does what a phone-home would: a TCP connection to the loopback port in `STANDIN_RAY_PHONE_HOME_PORT`, and writes
  whether it was blocked;
- writes `standin ray: joined`, then blocks: SIGTERM ends it with 0 (a stop); the head closing the GCS connection
  ends it with 1, as Ray's `--block` exits 1 when a process of the node dies (a failure: systemd starts it again).
"""

import argparse
import json
import os
import signal
import socket
import sys

REPORTED = ("HF_HUB_OFFLINE", "RAY_USAGE_STATS_ENABLED", "VLLM_HOST_IP", "VLLM_NO_USAGE_STATS", "RAY_ADDRESS")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ray")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start")
    start.add_argument("--address")
    start.add_argument("--head", action="store_true")
    start.add_argument("--port", type=int)
    start.add_argument("--node-ip-address", required=True)
    for flag in ("--node-manager-port", "--object-manager-port", "--min-worker-port", "--max-worker-port"):
        start.add_argument(flag, type=int, required=True)
    start.add_argument("--include-dashboard", choices=["false", "true"], required=True)
    start.add_argument("--disable-usage-stats", action="store_true")
    start.add_argument("--block", action="store_true")
    return parser.parse_args()


def _say(line: str) -> None:
    print(f"standin ray: {line}", file=sys.stderr, flush=True)


def _phone_home() -> None:
    port = os.environ.get("STANDIN_RAY_PHONE_HOME_PORT")
    if not port:
        return
    try:
        with socket.create_connection(("127.0.0.1", int(port)), timeout=5):
            _say(f"phone-home CONNECTED to 127.0.0.1:{port}")
    except OSError as exc:
        _say(f"phone-home refused: {type(exc).__name__}")


def _stop(_signum: int, _frame: object) -> None:
    os.write(2, b"standin ray: stopped\n")  # not print: the signal may land inside a print to stderr
    os._exit(0)


def _head(arguments: argparse.Namespace) -> int:
    """The GCS: accepts the cluster's connections and holds them until the stop."""
    signal.signal(signal.SIGTERM, _stop)
    gcs = socket.create_server((arguments.node_ip_address, arguments.port))
    _say(f"head listening on {arguments.node_ip_address}:{arguments.port}")
    held = []
    while True:
        connection, _ = gcs.accept()
        held.append(connection)


def main() -> int:
    arguments = _arguments()
    _say("started " + json.dumps({"argv": sys.argv[1:], "env": {key: os.environ.get(key) for key in REPORTED}}))
    if arguments.head:
        return _head(arguments)
    host, _, port = arguments.address.rpartition(":")
    gcs = socket.create_connection((host, int(port)), timeout=10)
    node_manager = socket.create_server((arguments.node_ip_address, arguments.node_manager_port))
    _phone_home()
    if arguments.block:
        signal.signal(signal.SIGTERM, _stop)
    _say("joined")
    if not arguments.block:
        return 0
    gcs.settimeout(None)
    while gcs.recv(4096):
        pass
    node_manager.close()
    _say("lost the head's GCS; exiting 1")
    return 1
