"""Ctrl-C at random moments into ``psd status --watch``, in one process against a local
cluster: how often a press is lost (the watch went on), and how often the process's
ZeroMQ context stops answering afterwards (libzmq's I/O thread blocked on a socket
monitor whose reader was gone: every later request of the process times out).

    python scripts/status_ctrl_c_soak.py [TRIALS] [MAX_DELAY_S]

Each trial starts a watch refreshing as fast as it can and sends SIGINT to the main
thread after a random delay (up to MAX_DELAY_S, 0.03 by default), so presses land
everywhere in a refresh: in the poll, while a reply is read and freed, while sockets
open and close. A watch still running 2 s after its press counts as lost (and is
interrupted again); after each trial one plain status call must be answered within
2 s, or the context counts as wedged and the soak stops. Bounded: TRIALS (300 by
default) trials on loopback. Prints one line of counts; exits 1 on any loss or wedge.
"""
from __future__ import annotations

import io
import os
import random
import signal
import sys
import threading
import time

import psd
from psd.cli.status import show_status
from psd.client import admin
from psd.errors import PsdTimeoutError


def main(trials: int, max_delay: float) -> int:
    main_thread = threading.main_thread().ident
    lost = escaped = 0
    wedged_at = None
    with psd.LocalCluster(servers=1, replication=1) as cluster:
        started = time.monotonic()
        for trial in range(trials):
            def press(delay=random.uniform(0.0005, max_delay)):
                time.sleep(delay)
                signal.pthread_kill(main_thread, signal.SIGINT)
                if not done.wait(2.0):  # still watching 2 s after the press: it was lost
                    nonlocal lost
                    lost += 1
                    while not done.wait(0.2):
                        signal.pthread_kill(main_thread, signal.SIGINT)

            done = threading.Event()
            presser = threading.Thread(target=press, daemon=True)
            try:
                presser.start()
                show_status(cluster.scheduler, watch=0.0001, out=io.StringIO())
            except KeyboardInterrupt:
                escaped += 1  # between the press and the watch's handler: not a loss
            done.set()
            while presser.is_alive():  # a press again, sent as the watch ended
                try:
                    presser.join()
                except KeyboardInterrupt:
                    pass
            try:
                admin.call(cluster.scheduler, "status", timeout=2.0)
            except PsdTimeoutError:
                wedged_at = trial
                break
        seconds = time.monotonic() - started
    ran = trials if wedged_at is None else wedged_at + 1
    print(f"{ran} trials in {seconds:.1f} s: {lost} presses lost, {escaped} raised outside the watch, "
          f"context wedged: {'no' if wedged_at is None else f'yes, after trial {wedged_at}'}")
    return 1 if lost or wedged_at is not None else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 300,
                  float(sys.argv[2]) if len(sys.argv) > 2 else 0.03))
