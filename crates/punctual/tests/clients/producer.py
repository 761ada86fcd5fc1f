"""A producer as people write it with redis-py: a shadow key with the payload, then PSETEX of the
key itself; some keys are cancelled with DEL. Prints each key's due time as JSON lines."""
import json
import sys
import time

import redis

port, prefix, count, base_ms, step_ms, cancels = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
r = redis.Redis(host="127.0.0.1", port=int(port), decode_responses=True)
for i in range(count):
    key = f"{prefix}:{i}"
    delay = base_ms + i * step_ms
    r.set("shadow:" + key, "payload of " + key)
    now = int(time.time() * 1000)
    r.psetex(key, delay, "")
    print(json.dumps({"key": key, "due_ms": now + delay}), flush=True)
for i in range(cancels):
    key = f"{prefix}:cancel{i}"
    r.set(key, "x", px=base_ms)
    assert r.delete(key) == 1
    assert r.get(key) is None
print(json.dumps({"done": True}), flush=True)
