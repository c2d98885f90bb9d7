package dev.comigs.edge.app

import android.content.Context
import android.os.Build
import androidx.work.BackoffPolicy
import androidx.work.Constraints
import androidx.work.CoroutineWorker
import androidx.work.ExistingPeriodicWorkPolicy
import androidx.work.NetworkType
import androidx.work.PeriodicWorkRequestBuilder
import androidx.work.WorkManager
import androidx.work.WorkerParameters
import dev.comigs.edge.core.ComigsException
import dev.comigs.edge.core.DeviceState
import dev.comigs.edge.core.Encoding
import dev.comigs.edge.core.RoundLoop
import dev.comigs.edge.core.SyncClient
import dev.comigs.sync.v1.DeviceCapabilities
import java.util.concurrent.TimeUnit
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.withContext

/**
 * One collaboration round in the background: only while charging and on unmetered Wi-Fi (WorkManager
 * constraints), so training never drains the battery or the data plan. If Android stops the job (the
 * constraints went away, or its ~10 minute execution window ended), the next run resumes: a persisted,
 * unacknowledged upload is re-sent under the same idempotency key before anything is retrained.
 */
class SyncWorker(context: Context, params: WorkerParameters) : CoroutineWorker(context, params) {
    override suspend fun doWork(): Result = withContext(Dispatchers.IO) {
        val files = DeviceFiles(applicationContext)
        try {
            val config = files.config()
            val options = SyncClient.Options().apply {
                target = config["target"] as String
                token = files.token.readText().trim()
                deviceId = (config["device_id"] as? String).orEmpty()
                caPem = if (files.caPem.exists()) files.caPem.readBytes() else null
                serverName = config["server_name"] as? String
            }
            val state = DeviceState.load(files.state.toPath())
            val loop = RoundLoop.Options().apply {
                encoding = Encoding.fromName((config["encoding"] as? String) ?: "int8")
                maxRounds = 1
                artifactDir = files.artifacts.toPath()
                artifacts = listOf(ExecuTorchTrainer.ARTIFACT)
                capabilities = DeviceCapabilities.newBuilder().setNumExperts(2).setNumGeneralists(1).setLoraRank(8)
                    .setRuntime("android-executorch").setRuntimeVersion("executorch-android 1.5.1")
                    .setPlatform("android-${Build.VERSION.SDK_INT} ${Build.MANUFACTURER} ${Build.MODEL}")
                    .setMemoryBudgetBytes(Runtime.getRuntime().maxMemory()).build()
            }
            SyncClient(options).use { client ->
                RoundLoop(client, state, ExecuTorchTrainer(files), loop, { event -> StatusLog.append(applicationContext, event) }, null).run()
            }
            Result.success()
        } catch (e: ComigsException) {
            StatusLog.append(applicationContext, mapOf("event" to "error", "kind" to e.kind().name, "message" to e.message))
            when (e.kind()) {
                ComigsException.Kind.UNAVAILABLE -> Result.retry() // nothing lost: try again later
                else -> Result.failure() // needs a person: token, corrupt state, tampered artifacts
            }
        }
    }

    companion object {
        private const val NAME = "comigs-rounds"

        fun schedule(context: Context) {
            val constraints = Constraints.Builder()
                .setRequiresCharging(true)
                .setRequiredNetworkType(NetworkType.UNMETERED)
                .build()
            val request = PeriodicWorkRequestBuilder<SyncWorker>(15, TimeUnit.MINUTES)
                .setConstraints(constraints)
                .setBackoffCriteria(BackoffPolicy.EXPONENTIAL, 1, TimeUnit.MINUTES)
                .build()
            WorkManager.getInstance(context).enqueueUniquePeriodicWork(NAME, ExistingPeriodicWorkPolicy.KEEP, request)
        }
    }
}
