/**
 * `fn` over `items`, at most `concurrency` calls at a time, results yielded in the items' order. The
 * window slides: the next item starts as soon as the oldest result is taken. A rejection is thrown
 * where its result would have been yielded (and never left unhandled while it waits its turn).
 */
export async function* mapInOrder<T, R>(items: readonly T[], concurrency: number, fn: (item: T, index: number) => Promise<R>): AsyncGenerator<R> {
  const ahead: Promise<R>[] = [];
  let next = 0;
  const start = () => {
    const index = next++;
    const result = fn(items[index] as T, index);
    result.catch(() => {}); // handled when its turn comes
    ahead.push(result);
  };
  while (next < items.length && ahead.length < concurrency) start();
  while (ahead.length > 0) {
    const result = await (ahead.shift() as Promise<R>);
    if (next < items.length) start();
    yield result;
  }
}
