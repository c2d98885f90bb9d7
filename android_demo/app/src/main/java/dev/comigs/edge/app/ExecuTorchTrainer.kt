package dev.comigs.edge.app

import android.os.Debug
import dev.comigs.edge.core.ArtifactManifest
import dev.comigs.edge.core.LocalTrainer
import dev.comigs.edge.core.Tensor as SyncTensor
import java.nio.FloatBuffer
import kotlin.math.max
import kotlin.random.Random
import org.pytorch.executorch.EValue
import org.pytorch.executorch.Tensor
import org.pytorch.executorch.training.SGD
import org.pytorch.executorch.training.TrainingModule

/**
 * Local CoMiGS training on the phone with ExecuTorch's training API, on the exported training program
 * (`comigs export --formats pte-train --train-generalists`): one joint forward/backward method whose
 * output 0 is the loss, parameters named "model." + the manifest's parameter names.
 *
 * Bi-level, as on the workstation: expert steps (group "experts" of the manifest's optimizer_groups) on
 * train windows, and every `router_every` steps `router_steps` router steps on validation windows, each
 * phase with its own optimiser over its own group only, so no gradient leaks between phases. ExecuTorch's
 * Android API ships SGD only (the Python trainer uses AdamW over the same program): this is SGD.
 *
 * Parameter tensors returned by `namedParameters` wrap the program's own memory (SGD.step updates them in
 * place); the downloaded generalist is written into them before the first step and read back after the
 * last. Verified only against ExecuTorch's sources, not on a phone (see README.md).
 */
class ExecuTorchTrainer(private val files: DeviceFiles, private val seed: Long = 0) : LocalTrainer {
    private var peakNativeBytes = 0L

    override fun train(roundId: Long, generalist: MutableMap<String, SyncTensor>, localConfig: Map<String, Any>): LocalTrainer.Result {
        val manifest = ArtifactManifest.load(files.artifacts.toPath())
        manifest.verify(listOf(ARTIFACT)) // never hand a tampered file to the runtime
        val entry = manifest.artifact(ARTIFACT)
        val batch = (entry["batch"] as Long).toInt()
        val seqLen = (entry["seq_len"] as Long).toInt()
        @Suppress("UNCHECKED_CAST")
        val groups = (entry["optimizer_groups"] as Map<String, List<String>>)
        val module = TrainingModule.load(
            manifest.path(ARTIFACT, "program").toString(), manifest.path(ARTIFACT, "data").toString())
        try {
            val train = DeviceFiles.readTokens(files.trainTokens)
            val valid = DeviceFiles.readTokens(files.validTokens)
            val rng = Random(seed * 1_000_003 + roundId)
            fun window(tokens: IntArray): Pair<Tensor, Tensor> {
                val ids = LongArray(batch * seqLen)
                val targets = LongArray(batch * seqLen)
                for (b in 0 until batch) {
                    val start = rng.nextInt(0, tokens.size - seqLen - 1)
                    for (t in 0 until seqLen) {
                        ids[b * seqLen + t] = tokens[start + t].toLong()
                        targets[b * seqLen + t] = tokens[start + t + 1].toLong()
                    }
                }
                val shape = longArrayOf(batch.toLong(), seqLen.toLong())
                return Tensor.fromBlob(ids, shape) to Tensor.fromBlob(targets, shape)
            }
            fun forwardBackward(tokens: IntArray): Float {
                val (ids, targets) = window(tokens)
                val out = module.executeForwardBackward(METHOD, EValue.from(ids), EValue.from(targets))
                peakNativeBytes = max(peakNativeBytes, Debug.getNativeHeapAllocatedSize())
                return out[0].toTensor().dataAsFloatArray[0]
            }

            forwardBackward(train) // the program exposes its parameters after a first call
            val params = module.namedParameters(METHOD)
            for ((name, value) in generalist) { // load the round's generalist into the program
                val buffer = requireNotNull(params[PREFIX + name]) { "the training program has no parameter $PREFIX$name" }
                    .rawDataBuffer as FloatBuffer
                buffer.rewind()
                buffer.put(value.values())
            }
            fun subset(group: String) = groups.getValue(group).associate { PREFIX + it to params.getValue(PREFIX + it) }
            val expertLr = (localConfig["expert_lr"] as? Double)?.takeIf { it > 0 } ?: 2e-3
            val routerLr = (localConfig["router_lr"] as? Double)?.takeIf { it > 0 } ?: 2e-3
            val steps = ((localConfig["local_steps"] as? Long) ?: 0L).toInt().takeIf { it > 0 } ?: 10
            val routerEvery = ((localConfig["router_every"] as? Long) ?: 0L).toInt().takeIf { it > 0 } ?: 30
            val routerSteps = ((localConfig["router_steps"] as? Long) ?: 0L).toInt().takeIf { it > 0 } ?: 10
            val experts = SGD.create(subset("experts"), expertLr)
            val router = groups["router"]?.let { SGD.create(subset("router"), routerLr) }
            var lastLoss = Float.NaN
            val started = System.nanoTime()
            for (step in 1..steps) {
                lastLoss = forwardBackward(train)
                experts.step(module.namedGradients(METHOD).filterKeys { it.removePrefix(PREFIX) in groups.getValue("experts") })
                if (router != null && step % routerEvery == 0) {
                    repeat(routerSteps) {
                        forwardBackward(valid)
                        router.step(module.namedGradients(METHOD).filterKeys { it.removePrefix(PREFIX) in groups.getValue("router") })
                    }
                }
            }
            val stepTime = (System.nanoTime() - started) / 1e9 / steps
            val validLoss = (1..VALID_WINDOWS).map { forwardBackward(valid).toDouble() }.average()
            val trained = generalist.mapValues { (name, value) ->
                val buffer = params.getValue(PREFIX + name).rawDataBuffer as FloatBuffer
                buffer.rewind()
                SyncTensor(value.shape(), FloatArray(buffer.remaining()).also { buffer.get(it) })
            }
            return LocalTrainer.Result(trained, steps.toLong() * batch * seqLen, lastLoss.toDouble(), validLoss,
                steps, stepTime, peakNativeBytes)
        } finally {
            module.close()
        }
    }

    companion object {
        const val ARTIFACT = "pte-train"
        const val METHOD = "forward"
        const val PREFIX = "model."
        const val VALID_WINDOWS = 4
    }
}
