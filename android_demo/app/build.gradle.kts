plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

val grpcVersion: String by rootProject.extra
val executorchVersion: String by rootProject.extra

android {
    namespace = "dev.comigs.edge.app"
    compileSdk = 35

    defaultConfig {
        applicationId = "dev.comigs.edge.app"
        minSdk = 26
        targetSdk = 35
        versionCode = 1
        versionName = "0.1"
        ndk {
            abiFilters += "arm64-v8a"
        }
    }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions {
        jvmTarget = "17"
    }
    packaging {
        resources {
            excludes += setOf("META-INF/INDEX.LIST", "META-INF/io.netty.versions.properties", "META-INF/DEPENDENCIES")
        }
    }
}

// -PexecutorchAar=/path/executorch.aar builds against a locally built AAR (ExecuTorch v1.5.1's
// scripts/build_android_library.sh) instead of Maven Central's org.pytorch:executorch-android.
val executorchAar: String? = providers.gradleProperty("executorchAar").orNull

dependencies {
    implementation(project(":core"))
    // Android gRPC transport (core only uses the transport-neutral io.grpc API).
    implementation("io.grpc:grpc-okhttp:$grpcVersion")
    implementation("io.grpc:grpc-android:$grpcVersion")
    if (executorchAar != null) {
        implementation(files(executorchAar))
        implementation("com.facebook.fbjni:fbjni:0.7.0")
        implementation("com.facebook.soloader:nativeloader:0.10.5")
    } else {
        implementation("org.pytorch:executorch-android:$executorchVersion")
    }
    implementation("androidx.work:work-runtime-ktx:2.9.1")
    implementation("androidx.appcompat:appcompat:1.7.0")
    implementation("androidx.lifecycle:lifecycle-runtime-ktx:2.8.7")
    implementation("org.jetbrains.kotlinx:kotlinx-coroutines-android:1.9.0")
}
