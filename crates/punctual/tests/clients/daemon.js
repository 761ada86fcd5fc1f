// A keyspace-notification daemon as people write it with node `redis` v4: configSet, a duplicate
// connection for pSubscribe, and for each expired key the shadow key and a SET NX lock.
const { createClient } = require('redis');

async function main() {
  const url = `redis://127.0.0.1:${process.argv[2]}`;
  const client = createClient({ url });
  await client.connect();
  await client.configSet('notify-keyspace-events', 'Ex');
  const sub = client.duplicate();
  await sub.connect();
  await sub.pSubscribe('__keyevent@0__:expired', async (key) => {
    const atMs = Date.now();
    const shadow = await client.get(`shadow:${key}`);
    const locked = await client.set(`lock:${key}`, '1', { NX: true, EX: 10 });
    await client.incr(`count:${key}`);
    console.log(JSON.stringify({ key, at_ms: atMs, shadow, lock: locked === 'OK' }));
  });
  console.log(JSON.stringify({ ready: true }));
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
