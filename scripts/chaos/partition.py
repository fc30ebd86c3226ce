#!/usr/bin/env python3
"""Partition: cut the leader off from both followers (iptables rules on the
loopback interface; every node has its own 127.0.0.x address), under a
steady write load; then heal. The followers elect a new leader and take
writes; the old leader commits nothing and answers consistent reads with
503; after healing it steps down, and every acknowledged write is on every
node. Needs root and iptables.

    scripts/chaos/partition.py [SECONDS=4]"""

import os
import subprocess
import sys
import time

from chaoslib import Cluster, Verdict, Writer, stop_and_check_nothing_lost, wait_steps_down

hold = float(sys.argv[1]) if len(sys.argv) > 1 else 4.0
v = Verdict("partition")
DOCKER = os.environ.get("VR_CHAOS_MODE") == "docker"

if not DOCKER:
    try:
        subprocess.run(["iptables", "-w", "-L", "INPUT", "-n"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        v.check(False, f"iptables is usable here (root, iptables installed): {e}")
        v.finish()

if True:
    with Cluster(3, own_addresses=True) as c:
        old = c.leader()
        followers = [i for i in c.ids if i != old]
        w = Writer(c)
        w.start()
        time.sleep(0.5)
        c.cut(old, followers)
        t0 = time.time()
        v.say(f"cut leader {old} off from {followers}")
        new = c.leader(among=followers, timeout=15)
        v.check(new != old, f"the followers elected node {new} {1000 * (time.time() - t0):.0f} ms after the cut")
        after = w.first_ack_after(t0, timeout=15)
        v.check(after is not None, "writes through the majority side go on")
        # In Docker mode the cut-off container is unreachable from the host
        # too (status None): either way, nothing is acknowledged.
        ok = (None, 503) if DOCKER else (503,)
        s, body, _ = c.services(old, consistent=True, timeout=15)
        v.check(s in ok, f"a consistent read on the cut-off old leader gets 503 (got {s})")
        s, body, _ = c.register(old, "minority-write", timeout=15)
        v.check(s in ok, f"a write on the cut-off old leader gets 503, not an acknowledgement (got {s})")
        time.sleep(max(0.0, hold - (time.time() - t0)))
        c.heal()
        v.say("healed")
        v.check(wait_steps_down(c, old), f"the old leader {old} steps down and follows the new one")
        stop_and_check_nothing_lost(v, c, w)
        s, body, _ = c.services(new, consistent=True)
        v.check(s == 200 and "minority-write" not in body, "the write refused on the minority side was never applied")
v.finish()
