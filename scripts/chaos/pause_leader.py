#!/usr/bin/env python3
"""SIGSTOP the leader for longer than the election timeout, then SIGCONT:
a new leader is elected meanwhile, the old one steps down when it wakes,
and nothing acknowledged is lost.

    scripts/chaos/pause_leader.py [PAUSE_SECONDS=3]"""

import sys
import time

from chaoslib import Cluster, Verdict, Writer, stop_and_check_nothing_lost, wait_steps_down

pause = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
v = Verdict("pause-leader")
with Cluster(3) as c:
    old = c.leader()
    w = Writer(c)
    w.start()
    time.sleep(0.5)
    c.pause(old)
    t0 = time.time()
    v.say(f"SIGSTOP leader {old} for {pause:.1f} s")
    others = [i for i in c.ids if i != old]
    new = c.leader(among=others, timeout=15)
    v.check(new != old, f"a new leader ({new}) was elected {1000 * (time.time() - t0):.0f} ms after the pause")
    after = w.first_ack_after(t0, timeout=15)
    v.check(after is not None, "writes went on during the pause")
    time.sleep(max(0.0, pause - (time.time() - t0)))
    c.resume(old)
    v.say(f"SIGCONT {old}")
    v.check(wait_steps_down(c, old), f"the old leader {old} stepped down and follows the new leader")
    stop_and_check_nothing_lost(v, c, w)
v.finish()
