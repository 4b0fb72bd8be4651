import * as tf from "@tensorflow/tfjs";
import { keys } from "#shared/keys.ts";
import type { ObjectStore } from "#shared/s3/store.ts";
import type { Checkpointer, EpochLog, TrainingState } from "./head.ts";

/**
 * Fine-tuning checkpoints in S3: after every epoch the weights (and the best epoch's weights) go to
 * `runs/<model>/<version>/finetune.bin`, then the small JSON that makes them current. A job killed by
 * a spot reclaim and retried by Batch continues after its last finished epoch. Deleted on success.
 */
export function s3Checkpointer(store: ObjectStore, name: string, version: string, phase: string): Checkpointer & { clear(): Promise<void> } {
  const base = `${keys.run(name, version)}${phase}`;
  return {
    async load() {
      const json = await store.get(`${base}.json`);
      if (!json) return null;
      try {
        const meta = JSON.parse(new TextDecoder().decode(json)) as {
          epoch: number;
          history: EpochLog[];
          best?: { loss: number; epoch: number };
          specs: tf.io.WeightsManifestEntry[];
          count: number;
          bin: string;
        };
        const bin = await store.get(`${base}-${meta.bin}.bin`);
        if (!bin) return null;
        const named = tf.io.decodeWeights(bin.buffer.slice(bin.byteOffset, bin.byteOffset + bin.byteLength) as ArrayBuffer, meta.specs);
        const weights = Array.from({ length: meta.count }, (_, i) => named[`w${i}`] as tf.Tensor);
        const best = meta.best ? { ...meta.best, weights: Array.from({ length: meta.count }, (_, i) => named[`b${i}`] as tf.Tensor) } : undefined;
        return { epoch: meta.epoch, history: meta.history, weights, best } satisfies TrainingState;
      } catch {
        return null; // a torn checkpoint: start this phase over
      }
    },
    async save(state) {
      const named: tf.NamedTensorMap = {};
      state.weights.forEach((w, i) => {
        named[`w${i}`] = w;
      });
      state.best?.weights.forEach((w, i) => {
        named[`b${i}`] = w;
      });
      const { data, specs } = await tf.io.encodeWeights(named);
      const bin = `e${state.epoch}`;
      await store.put(`${base}-${bin}.bin`, new Uint8Array(data as ArrayBuffer));
      const meta = {
        epoch: state.epoch,
        history: state.history,
        best: state.best && { loss: state.best.loss, epoch: state.best.epoch },
        specs,
        count: state.weights.length,
        bin,
      };
      await store.put(`${base}.json`, JSON.stringify(meta), "application/json");
    },
    async clear() {
      const old: string[] = [];
      for await (const o of store.list(base)) old.push(o.key);
      if (old.length > 0) await store.delete(old);
    },
  };
}
