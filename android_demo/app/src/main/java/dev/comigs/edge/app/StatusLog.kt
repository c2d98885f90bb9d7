package dev.comigs.edge.app

import android.content.Context
import dev.comigs.edge.core.Json
import java.io.File

/** The round loop's events, one JSON object per line, shown by MainActivity (last 200 kept). */
object StatusLog {
    private fun file(context: Context) = File(context.filesDir, "events.jsonl")

    @Synchronized
    fun append(context: Context, event: Map<String, Any?>) {
        val line = Json.write(event.filterValues { it != null } + ("time_ms" to System.currentTimeMillis()))
        val lines = (read(context) + line).takeLast(200)
        file(context).writeText(lines.joinToString("\n", postfix = "\n"))
    }

    @Synchronized
    fun read(context: Context): List<String> =
        file(context).takeIf { it.exists() }?.readLines()?.filter { it.isNotBlank() } ?: emptyList()
}
