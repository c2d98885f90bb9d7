package dev.comigs.edge.harness;

import dev.comigs.edge.core.LocalTrainer;
import dev.comigs.edge.core.Tensor;
import java.util.Map;

/**
 * The JVM conformance test's trainer. It is NOT a model and does not learn anything: it applies a
 * deterministic, documented update to the generalist so the Python test can predict the exact delta.
 *
 * <pre>
 *   trained[name][j] = base[name][j] + ((H(name) + 7*j + 13*round + 31*seed) mod 513 - 256) / 256
 *   H(name) = (sum of the name's UTF-16 code units) mod 1000
 * </pre>
 *
 * (float32 addition). The phone's real trainer is ExecuTorch, running the same exported training .pte that
 * the Python ExecuTorch backend exercises (edge_runtime/artifacts/executorch_training.py).
 */
public final class DeterministicTrainer implements LocalTrainer {
  private final long seed;
  private final long samples;

  public DeterministicTrainer(long seed, long samples) {
    this.seed = seed;
    this.samples = samples;
  }

  static long nameHash(String name) {
    long h = 0;
    for (int i = 0; i < name.length(); i++) {
      h += name.charAt(i);
    }
    return h % 1000;
  }

  public static float step(String name, long j, long round, long seed) {
    long k = Math.floorMod(nameHash(name) + 7 * j + 13 * round + 31 * seed, 513L) - 256;
    return k / 256f;
  }

  @Override
  public Result train(long roundId, Map<String, Tensor> generalist, Map<String, Object> localConfig) {
    for (Map.Entry<String, Tensor> entry : generalist.entrySet()) {
      float[] values = entry.getValue().values();
      for (int j = 0; j < values.length; j++) {
        values[j] = values[j] + step(entry.getKey(), j, roundId, seed);
      }
    }
    Object steps = localConfig.get("local_steps");
    Integer localSteps = steps instanceof Long ? (int) (long) (Long) steps : null;
    return new Result(generalist, samples, null, null, localSteps, null, null);
  }
}
