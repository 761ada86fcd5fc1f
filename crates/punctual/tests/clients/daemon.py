"""A keyspace-notification daemon as people write it with redis-py: CONFIG SET, PSUBSCRIBE, and for
each expired key the shadow key's value and a SET NX lock. Prints one JSON line per event.
Usage: daemon.py PORT [USER]; with USER it connects as redis://USER:secret@…, which names its group."""
import json
import sys
import time

import redis

port = int(sys.argv[1])
user = sys.argv[2] if len(sys.argv) > 2 else None
r = redis.Redis(
    host="127.0.0.1",
    port=port,
    username=user,
    password="secret" if user else None,
    decode_responses=True,
)  # RESP3 in redis-py 8
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
    r.incr("count:" + key + (":" + user if user else ""))
    print(json.dumps({"key": key, "at_ms": at_ms, "shadow": shadow, "lock": bool(locked)}), flush=True)
