package dev.comigs.edge.app

import android.content.Context
import dev.comigs.edge.core.Json
import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder

/**
 * Where the app finds what `adb push` side-loaded (its external files directory, readable without any
 * permission) and where it keeps its own durable state (private storage).
 *
 *   <external>/artifacts/   manifest.json + training.pte + training.gNNNN.experts.ptd (comigs export)
 *   <external>/data/        train.bin, valid.bin: int32 little-endian token ids
 *   <external>/tokenizer.json  the base model's Hugging Face tokenizer (for generation)
 *   <external>/sync.json    {"target": "host:50051", "device_id": "pixel-7", "server_name": optional}
 *   <external>/device.token, <external>/ca.pem
 *   <private>/sync/state.json  DeviceState (uploads, keys, generalist cache), written atomically
 */
class DeviceFiles(context: Context) {
    val external: File = requireNotNull(context.getExternalFilesDir(null)) { "no external files directory" }
    val artifacts = File(external, "artifacts")
    val trainTokens = File(external, "data/train.bin")
    val validTokens = File(external, "data/valid.bin")
    val tokenizer = File(external, "tokenizer.json")
    val syncConfig = File(external, "sync.json")
    val token = File(external, "device.token")
    val caPem = File(external, "ca.pem")
    val state = File(context.filesDir, "sync/state.json")

    fun config(): Map<String, Any?> = Json.asObject(Json.parse(syncConfig.readText()), "sync.json")

    companion object {
        /** int32 little-endian token ids, memory-light enough for the demo's data sizes. */
        fun readTokens(file: File): IntArray {
            val bytes = file.readBytes()
            require(bytes.size % 4 == 0) { "$file is not a whole number of int32 token ids" }
            val buffer = ByteBuffer.wrap(bytes).order(ByteOrder.LITTLE_ENDIAN).asIntBuffer()
            return IntArray(buffer.remaining()).also { buffer.get(it) }
        }
    }
}
