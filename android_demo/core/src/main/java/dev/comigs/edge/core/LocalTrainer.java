package dev.comigs.edge.core;

import java.util.Map;

/**
 * Local training of one round, behind an interface so the round loop does not know the runtime.
 *
 * <p>The Android app implements it with ExecuTorch's training API (the exported training .pte); the JVM
 * conformance harness implements it with a deterministic, documented update (no model at all).
 */
public interface LocalTrainer {
  /** What a round of local training produced. */
  final class Result {
    /** The generalist tensors after training (same names and shapes as the input). */
    public final Map<String, Tensor> generalist;
    /** Training samples behind the update: the FedAvg weight the coordinator uses (>= 1). */
    public final long numSamples;
    public final Double trainLoss;
    public final Double validLoss;
    public final Integer localSteps;
    public final Double stepTimeS;
    public final Long peakMemoryBytes;

    public Result(Map<String, Tensor> generalist, long numSamples, Double trainLoss, Double validLoss,
        Integer localSteps, Double stepTimeS, Long peakMemoryBytes) {
      this.generalist = generalist;
      this.numSamples = numSamples;
      this.trainLoss = trainLoss;
      this.validLoss = validLoss;
      this.localSteps = localSteps;
      this.stepTimeS = stepTimeS;
      this.peakMemoryBytes = peakMemoryBytes;
    }
  }

  /**
   * Train from {@code generalist} (a private copy the trainer may modify) with the coordinator's local
   * config ({@code local_steps}, {@code router_every}, ...; 0 means the device default).
   */
  Result train(long roundId, Map<String, Tensor> generalist, Map<String, Object> localConfig) throws Exception;
}
