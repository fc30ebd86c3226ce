#!/usr/bin/env python3
"""The seed's test 5: a registered service crashes (kill -9, so it never
deregisters); it disappears from every node once its TTL has run out, and
the gateway then answers 503 for it. Also the seed's test 3 for the gateway:
with every registry node down, the gateway keeps routing a live service on
its last-known routes.

    scripts/chaos/ttl_expiry.py [TTL_SECONDS=5]"""

import sys
import time

from chaoslib import Cluster, Verdict, http

ttl = int(sys.argv[1]) if len(sys.argv) > 1 else 5
v = Verdict("ttl-expiry")
with Cluster(3) as c:
    c.leader()
    gw = c.start_gateway()
    crash = c.start_demo("osint_service", ttl)
    c.start_demo("nmap_service", ttl)

    def routed(name):
        s, _, _ = http("GET", f"{gw}/v2/{name}/health", timeout=3)
        return s

    deadline = time.time() + 40
    while time.time() < deadline and not (routed("osint_service") == 200 and routed("nmap_service") == 200):
        time.sleep(0.1)
    v.check(routed("osint_service") == 200, "the gateway routes /v2/osint_service/health to the demo service")

    crash()
    t0 = time.time()
    v.say(f"kill -9 of the osint_service demo (ttl {ttl} s)")
    gone_at = None
    while time.time() < t0 + ttl + 15:
        statuses = [http("GET", c.url(i) + "/services/osint_service", timeout=2)[0] for i in c.running()]
        if all(s == 404 for s in statuses):
            gone_at = time.time()
            break
        time.sleep(0.1)
    v.check(gone_at is not None, "osint_service disappeared from every node")
    if gone_at:
        took = gone_at - t0
        v.say(f"gone from every node {took:.1f} s after the crash")
        # Its last acknowledged heartbeat was at most ttl/2 before the crash
        # (the demo beats every ttl/2), and nothing may go earlier than ttl
        # after that: so no sooner than ttl/2 after the crash (t0 is taken
        # just after it, hence the half second).
        v.check(took >= ttl / 2 - 0.5, f"not before its TTL after its last heartbeat (>= ttl/2 = {ttl / 2:.1f} s after the crash)")
        v.check(took <= ttl + 5 + 1, f"within ttl + 5 s (+1 s of polling)")
    deadline = time.time() + 10
    while time.time() < deadline and routed("osint_service") != 503:
        time.sleep(0.1)
    s, body, _ = http("GET", f"{gw}/v2/osint_service/health", timeout=3)
    v.check(s == 503, f"the gateway answers 503 for the expired service (got {s}: {body})")

    # The seed's test 3: every registry node down, the gateway keeps routing.
    for i in c.ids:
        c.kill9(i)
    v.say("kill -9 of every registry node")
    ok = 0
    for _ in range(10):
        s, _, headers = http("GET", f"{gw}/v2/nmap_service/health", timeout=3)
        ok += s == 200
        time.sleep(0.1)
    v.check(ok == 10, f"with the registry down, 10 of 10 requests still routed on last-known routes ({ok})")
    age = {k.lower(): val for k, val in headers.items()}.get("x-gateway-route-age")
    v.check(age is not None, f"... and they say how old the route is (X-Gateway-Route-Age: {age})")
v.finish()
