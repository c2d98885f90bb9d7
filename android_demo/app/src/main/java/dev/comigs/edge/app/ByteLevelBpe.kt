package dev.comigs.edge.app

import dev.comigs.edge.core.Json
import java.io.File

/**
 * GPT-2-style byte-level BPE from a Hugging Face tokenizer.json (`model.vocab`, `model.merges`), enough
 * for SmolLM2's tokenizer in a demo: bytes are mapped to the GPT-2 unicode alphabet, words are split with
 * the GPT-2 pre-tokenisation pattern, then merged by rank. Special tokens and normalisers are ignored.
 * NOT verified against `transformers` here (no phone, no Android build); check token ids on a workstation
 * before trusting perplexities computed from text tokenised on the phone (training uses pre-tokenised ids).
 */
class ByteLevelBpe(file: File) {
    private val vocab: Map<String, Int>
    private val inverse: Map<Int, String>
    private val ranks: Map<Pair<String, String>, Int>
    val eosId: Int

    init {
        val root = Json.asObject(Json.parse(file.readText()), "tokenizer.json")
        val model = Json.asObject(root["model"], "model")
        vocab = Json.asObject(model["vocab"], "vocab").mapValues { (it.value as Long).toInt() }
        inverse = vocab.entries.associate { it.value to it.key }
        ranks = Json.asList(model["merges"], "merges").mapIndexed { i, m ->
            val parts = if (m is String) m.split(" ", limit = 2) else Json.asList(m, "merge").map { it as String }
            (parts[0] to parts[1]) to i
        }.toMap()
        eosId = vocab["<|endoftext|>"] ?: vocab["<|im_end|>"] ?: -1
    }

    private val byteToChar: Map<Int, Char> = run {
        val bytes = (33..126) + (161..172) + (174..255)
        val map = bytes.associateWith { it.toChar() }.toMutableMap()
        var n = 0
        for (b in 0..255) if (b !in map) { map[b] = (256 + n).toChar(); n++ }
        map
    }
    private val charToByte = byteToChar.entries.associate { it.value to it.key }
    private val pattern = Regex("""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    fun encode(text: String): List<Int> = pattern.findAll(text).flatMap { match ->
        var parts = match.value.toByteArray().map { byteToChar.getValue(it.toInt() and 0xff).toString() }
        while (parts.size > 1) {
            val best = parts.zipWithNext().withIndex().minByOrNull { ranks[it.value] ?: Int.MAX_VALUE } ?: break
            if (ranks[best.value] == null) break
            parts = parts.subList(0, best.index) + (best.value.first + best.value.second) + parts.subList(best.index + 2, parts.size)
        }
        parts.map { vocab[it] ?: error("token '$it' is not in the vocabulary") }.asSequence()
    }.toList()

    fun decode(ids: List<Int>): String {
        val bytes = ids.flatMap { id -> (inverse[id] ?: "").map { c -> (charToByte[c] ?: '?'.code).toByte() } }
        return String(bytes.toByteArray(), Charsets.UTF_8)
    }
}
