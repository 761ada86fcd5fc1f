// A producer as people write it with node `redis` v4: the shadow key, then PSETEX (the blog form with
// an empty value); some keys cancelled with DEL.
const { createClient } = require('redis');

async function main() {
  const [port, prefix, count, baseMs, stepMs, cancels] = process.argv.slice(2);
  const client = createClient({ url: `redis://127.0.0.1:${port}` });
  await client.connect();
  for (let i = 0; i < Number(count); i++) {
    const key = `${prefix}:${i}`;
    const delay = Number(baseMs) + i * Number(stepMs);
    await client.set(`shadow:${key}`, `payload of ${key}`);
    const now = Date.now();
    await client.PSETEX(key, delay, '');
    console.log(JSON.stringify({ key, due_ms: now + delay }));
  }
  for (let i = 0; i < Number(cancels); i++) {
    const key = `${prefix}:cancel${i}`;
    await client.set(key, 'x', { PX: Number(baseMs) });
    if ((await client.del(key)) !== 1) throw new Error('DEL did not delete');
  }
  console.log(JSON.stringify({ done: true }));
  await client.quit();
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
