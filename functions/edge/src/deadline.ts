/**
 * `work`, or a rejection with `late()` after `ms`. The timer is made here, in the calling request's
 * context (workerd cancels a request that waits on nothing of its own: see http/admission.ts), and
 * cleared either way. The work itself goes on; its own failure after the deadline is of no interest.
 */
export function withDeadline<T>(work: Promise<T>, ms: number, late: () => Error): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(late()), ms);
  });
  work.catch(() => {});
  return Promise.race([work, deadline]).finally(() => {
    if (timer !== undefined) clearTimeout(timer);
  });
}
