// Versions (see README.md "Build on a workstation"): Gradle 8.11.1, AGP 8.7.3, Kotlin 2.0.21, JDK 17.
plugins {
    id("com.android.application") version "8.7.3" apply false
    id("org.jetbrains.kotlin.android") version "2.0.21" apply false
    id("com.google.protobuf") version "0.9.4" apply false
}

// The versions the JVM conformance test compiles and runs `core` against (Debian bookworm's packages):
// keep them equal so what was tested is what ships.
extra["grpcVersion"] = "1.41.3"
extra["protobufVersion"] = "3.21.12"
// Must match the Python `executorch==1.5.1` that exported the .pte/.ptd files.
extra["executorchVersion"] = "1.5.1"
