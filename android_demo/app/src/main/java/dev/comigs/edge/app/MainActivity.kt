package dev.comigs.edge.app

import android.app.ActivityManager
import android.os.Bundle
import android.os.Debug
import android.widget.Button
import android.widget.EditText
import android.widget.TextView
import androidx.appcompat.app.AppCompatActivity
import androidx.lifecycle.lifecycleScope
import dev.comigs.edge.core.ArtifactManifest
import dev.comigs.edge.core.ComigsException
import dev.comigs.edge.core.DeviceState
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.launch
import kotlinx.coroutines.withContext

/** Round status, local loss / perplexity, memory; buttons to verify artifacts, join rounds, generate. */
class MainActivity : AppCompatActivity() {
    private lateinit var files: DeviceFiles
    private lateinit var status: TextView
    private lateinit var output: TextView

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_main)
        files = DeviceFiles(this)
        status = findViewById(R.id.status)
        output = findViewById(R.id.output)
        findViewById<Button>(R.id.importButton).setOnClickListener { verifyArtifacts() }
        findViewById<Button>(R.id.scheduleButton).setOnClickListener {
            SyncWorker.schedule(this)
            output.text = "Scheduled: rounds run while charging on unmetered Wi-Fi."
        }
        findViewById<Button>(R.id.generateButton).setOnClickListener {
            generate(findViewById<EditText>(R.id.prompt).text.toString())
        }
    }

    override fun onResume() {
        super.onResume()
        refresh()
    }

    private fun verifyArtifacts() = lifecycleScope.launch {
        output.text = withContext(Dispatchers.IO) {
            try {
                val manifest = ArtifactManifest.load(files.artifacts.toPath())
                manifest.verify(listOf(ExecuTorchTrainer.ARTIFACT))
                "Artifacts OK: export ${manifest.exportId()}, generation ${manifest.generation()}"
            } catch (e: ComigsException) {
                "Refused: ${e.message}"
            }
        }
    }

    private fun generate(prompt: String) = lifecycleScope.launch {
        output.text = "Generating…"
        output.text = withContext(Dispatchers.Default) {
            try {
                prompt + ExecuTorchGenerator(files, ByteLevelBpe(files.tokenizer)).generate(prompt, 32)
            } catch (e: Exception) {
                "Generation failed: ${e.message}"
            }
        }
        refresh()
    }

    private fun refresh() = lifecycleScope.launch {
        status.text = withContext(Dispatchers.IO) { describe() }
    }

    private fun describe(): String = buildString {
        try {
            val state = DeviceState.load(files.state.toPath())
            appendLine("device: ${state.deviceId().ifEmpty { "(not registered)" }}")
            appendLine("rounds completed: ${state.roundsCompleted()}, generalist v${state.generalistVersion()}")
            appendLine("pending uploads: ${state.pendingUploads().map { it.roundId }}")
            val metrics = state.lastMetrics()
            metrics["train_loss"]?.let { appendLine("local train loss: %.4f".format(it as Double)) }
            metrics["valid_loss"]?.let { appendLine("local valid loss: %.4f".format(it as Double)) }
            metrics["perplexity"]?.let { appendLine("local perplexity: %.2f".format(it as Double)) }
        } catch (e: ComigsException) {
            appendLine("state: ${e.message}")
        }
        val memory = ActivityManager.MemoryInfo().also { (getSystemService(ACTIVITY_SERVICE) as ActivityManager).getMemoryInfo(it) }
        appendLine("native heap: %.1f MB, device available: %.0f / %.0f MB".format(
            Debug.getNativeHeapAllocatedSize() / 1e6, memory.availMem / 1e6, memory.totalMem / 1e6))
        StatusLog.read(this@MainActivity).takeLast(5).forEach { appendLine(it) }
    }
}
