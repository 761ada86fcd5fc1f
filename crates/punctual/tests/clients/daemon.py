"""A keyspace-notification daemon as people write it with redis-py: CONFIG SET, PSUBSCRIBE, and for
each expired key the shadow key's value and a SET NX lock. Prints one JSON line per event."""
import json
import sys
import time

import redis

port = int(sys.argv[1])
r = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)  # RESP3 in redis-py 8
r.config_set("notify-keyspace-events", "Ex")
p = r.pubsub()
p.psubscribe("__keyevent@0__:expired")
for message in p.listen():
    if message["type"] == "psubscribe":
        print(json.dumps({"ready": True}), flush=True)
        continue
    if message["type"] != "pmessage":
        continue
    key = message["data"]
    at_ms = int(time.time() * 1000)
    shadow = r.get("shadow:" + key)
    locked = r.set("lock:" + key, "1", nx=True, ex=10)
    r.incr("count:" + key)
    print(json.dumps({"key": key, "at_ms": at_ms, "shadow": shadow, "lock": bool(locked)}), flush=True)
