package dev.comigs.edge.app

import dev.comigs.edge.core.ArtifactManifest
import dev.comigs.edge.core.Generator
import org.pytorch.executorch.EValue
import org.pytorch.executorch.Tensor
import org.pytorch.executorch.training.TrainingModule

/**
 * Greedy text generation with the current experts.
 *
 * The export's inference program keeps its experts in a `.ptd`, and the ExecuTorch Android `Module.load`
 * API we checked (executorch-android 1.x sources) takes no data-file path; `TrainingModule.load(pte, ptd)`
 * does. So generation runs the training program's forward/backward (output 1 = logits [batch, seq_len,
 * vocab]) on a right-padded window and reads the logits at the last real position (the model is causal,
 * so padding after it changes nothing). It costs a backward pass per token: a demo, not a chat app.
 * Switch to the inference .pte once the Java Module API accepts a data path: its forward takes
 * (input_ids [batch, seq], logit_positions [P]) and a prefill passes the last position only, so the
 * LM head runs on one row (export/README.md, manifest format_version 2).
 */
class ExecuTorchGenerator(private val files: DeviceFiles, private val tokenizer: ByteLevelBpe) : Generator {
    override fun generate(prompt: String, maxNewTokens: Int): String {
        val manifest = ArtifactManifest.load(files.artifacts.toPath())
        manifest.verify(listOf(ExecuTorchTrainer.ARTIFACT))
        val entry = manifest.artifact(ExecuTorchTrainer.ARTIFACT)
        val batch = (entry["batch"] as Long).toInt()
        val seqLen = (entry["seq_len"] as Long).toInt()
        val module = TrainingModule.load(
            manifest.path(ExecuTorchTrainer.ARTIFACT, "program").toString(),
            manifest.path(ExecuTorchTrainer.ARTIFACT, "data").toString())
        try {
            val tokens = tokenizer.encode(prompt).toMutableList()
            val generated = mutableListOf<Int>()
            repeat(maxNewTokens) {
                val context = tokens.takeLast(seqLen)
                val ids = LongArray(batch * seqLen)
                context.forEachIndexed { i, t -> ids[i] = t.toLong() }
                val shape = longArrayOf(batch.toLong(), seqLen.toLong())
                val out = module.executeForwardBackward(ExecuTorchTrainer.METHOD,
                    EValue.from(Tensor.fromBlob(ids, shape)), EValue.from(Tensor.fromBlob(ids.copyOf(), shape)))
                val logits = out[1].toTensor().dataAsFloatArray
                val vocab = logits.size / (batch * seqLen)
                val row = (context.size - 1) * vocab
                var best = 0
                for (v in 1 until vocab) if (logits[row + v] > logits[row + best]) best = v
                if (best == tokenizer.eosId) return tokenizer.decode(generated)
                tokens.add(best)
                generated.add(best)
            }
            return tokenizer.decode(generated)
        } finally {
            module.close()
        }
    }
}
