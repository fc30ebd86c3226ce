#!/usr/bin/env python3
"""kill -9 of the leader, ROUNDS times, under a steady write load: measures
the time from each kill to the first acknowledged write after it, and checks
that no acknowledged write is lost.

    scripts/chaos/kill_leader.py [ROUNDS=5]"""

import sys
import time

from chaoslib import Cluster, Verdict, Writer, percentile, stop_and_check_nothing_lost

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
v = Verdict("kill-leader")
with Cluster(3) as c:
    c.leader()
    w = Writer(c)
    w.start()
    times = []
    for r in range(1, rounds + 1):
        leader = c.leader()
        time.sleep(0.5)  # some load on the steady state first
        c.kill9(leader)
        # From the moment the kill has happened (docker kill returns after
        # a round trip; writes acknowledged before it do not count).
        t0 = time.time()
        after = w.first_ack_after(t0, timeout=30)
        if after is None:
            v.check(False, f"round {r}: a write succeeded after killing leader {leader}")
            break
        times.append(after - t0)
        v.say(f"round {r}: kill -9 of leader {leader}; next acknowledged write after {1000 * (after - t0):.0f} ms")
        c.spawn(leader)
        c.leader(among=c.running())
    stop_and_check_nothing_lost(v, c, w)
    if times:
        v.say(
            f"failover: p50 {1000 * percentile(times, 0.5):.0f} ms, max {1000 * max(times):.0f} ms over {len(times)} kills"
        )
    v.check(len(times) == rounds, f"every one of {rounds} kills was followed by a successful write")
    v.check(bool(times) and max(times) < 5.0, "each failover took under 5 s")
    v.check(not any(k.startswith("5") and k != "503" for k in w.errors), "no 5xx other than 503 during failover")
v.finish()
