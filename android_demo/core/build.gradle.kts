// Plain Java 17 library: the device logic shared by the app and the JVM conformance harness.
// No Android imports; gRPC stubs are generated from ../../protos (the same .proto as the coordinator).
plugins {
    `java-library`
    id("com.google.protobuf")
}

val grpcVersion: String by rootProject.extra
val protobufVersion: String by rootProject.extra

java {
    sourceCompatibility = JavaVersion.VERSION_17
    targetCompatibility = JavaVersion.VERSION_17
}

sourceSets {
    main {
        proto {
            srcDir("../../protos")
        }
    }
}

dependencies {
    api("io.grpc:grpc-api:$grpcVersion")
    api("io.grpc:grpc-stub:$grpcVersion")
    api("io.grpc:grpc-protobuf:$grpcVersion")
    api("com.google.protobuf:protobuf-java:$protobufVersion")
    // javax.annotation.Generated on the generated stubs (Java 11+ no longer ships it).
    compileOnly("org.apache.tomcat:annotations-api:6.0.53")
    // The JVM transport, for running `core` off Android (the app uses grpc-okhttp instead).
    testRuntimeOnly("io.grpc:grpc-netty-shaded:$grpcVersion")
}

protobuf {
    protoc {
        artifact = "com.google.protobuf:protoc:$protobufVersion"
    }
    plugins {
        create("grpc") {
            artifact = "io.grpc:protoc-gen-grpc-java:$grpcVersion"
        }
    }
    generateProtoTasks {
        all().forEach { task ->
            task.plugins {
                create("grpc")
            }
        }
    }
}
