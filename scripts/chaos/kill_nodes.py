#!/usr/bin/env python3
"""The seed's resilience tests 1-3 against registry nodes: kill one node,
then a second, then the last. Reads go on at the survivors; writes succeed
while a majority lives, and get a prompt 503 (no hang, no 500) without one;
after a restart of all three nothing acknowledged is missing.
(The gateway's part of test 3, serving last-known routes with every node
down, is checked by the gateway's own tests.)"""

import time

from chaoslib import Cluster, Verdict, all_present, http

v = Verdict("kill-nodes")
with Cluster(3, extra_args=["--leader-wait-ms", "2000"]) as c:
    leader = c.leader()
    acked = []
    for i in range(10):
        s, _, _ = c.register(c.ids[i % 3], f"svc-{i}")
        if s == 200:
            acked.append(f"svc-{i}")
    v.check(len(acked) == 10, "10 registrations on a healthy cluster")

    # Test 1: one node down.
    first = next(i for i in c.ids if i != leader)
    c.kill9(first)
    v.say(f"killed node {first}")
    for i in c.running():
        s, body, _ = c.services(i)
        v.check(s == 200 and set(acked) <= set(body), f"node {i} still answers reads")
    s, _, _ = c.register(c.running()[0], "after-one-down")
    v.check(s == 200, "a write succeeds with two of three nodes")
    acked.append("after-one-down")

    # Test 2: two nodes down: no majority.
    second = c.running()[0]
    c.kill9(second)
    last = c.running()[0]
    v.say(f"killed node {second}; node {last} is alone")
    s, body, headers = c.services(last)
    v.check(s == 200 and set(acked) <= set(body), f"the last node still answers default reads ({s})")
    t0 = time.time()
    s, body, headers = c.register(last, "no-majority", timeout=15)
    took = time.time() - t0
    v.check(s == 503, f"a write without a majority gets 503 (got {s})")
    v.check(took < c.leader_wait + 2, f"... promptly: {took:.1f} s (the leader wait is {c.leader_wait:.0f} s)")
    v.check("Retry-After" in headers or "retry-after" in headers, "... with Retry-After")
    s, _, _ = c.services(last, consistent=True, timeout=15)
    v.check(s == 503, f"a consistent read without a majority gets 503 (got {s})")
    s, h, _ = http("GET", c.url(last) + "/health")
    v.check(s == 503, f"/health says unhealthy without a leader (got {s})")

    # Test 3: all down, then all back: nothing lost.
    c.kill9(last)
    v.say("killed the last node; restarting all three")
    for i in c.ids:
        c.spawn(i)
    c.leader()
    for node, gone in all_present(c, acked).items():
        v.check(not gone, f"node {node} has all {len(acked)} acknowledged writes after the restart")
v.finish()
