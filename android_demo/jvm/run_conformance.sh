#!/usr/bin/env bash
# JVM build and conformance test of android_demo/core (no Android SDK, no Gradle needed).
#
#   android_demo/jvm/run_conformance.sh              build if needed, then run tests/android with pytest
#   android_demo/jvm/run_conformance.sh --build-only build if needed, print the runtime classpath
#
# Uses Debian's Java toolchain: default-jdk-headless (OpenJDK 17), protobuf-compiler + libprotobuf-java
# (3.21.12: protoc's output compiles against exactly this runtime), protobuf-compiler-grpc-java-plugin +
# libgrpc-java (1.41.3). Debian's libgrpc-java does not declare its runtime dependencies, so netty,
# perfmark and gson are installed too, and Debian's netty 4.1.48 has no JDK ALPN support (the classes
# are stripped), which gRPC needs for TLS: netty-tcnative (OpenSSL, with ALPN) provides it (run java
# with -Djava.library.path=android_demo/jvm/build/native).
# Installed with apt-get only when missing. Exit code 77: the JDK
# cannot be installed here (no apt-get / no root), so the caller may skip.
# Build output: android_demo/jvm/build/ (gitignored); rebuilt only when an input changed.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
BUILD="$HERE/build"
JARS=/usr/share/java
PACKAGES="default-jdk-headless libgrpc-java libprotobuf-java protobuf-compiler protobuf-compiler-grpc-java-plugin libnetty-java libperfmark-java libgoogle-gson-java libnetty-tcnative-java libnetty-tcnative-jni"
RUNTIME_JARS="grpc-api grpc-context grpc-core grpc-netty grpc-protobuf grpc-protobuf-lite grpc-stub protobuf guava perfmark-api gson
  netty-buffer netty-codec netty-codec-http netty-codec-http2 netty-codec-socks netty-common netty-handler netty-handler-proxy
  netty-resolver netty-transport netty-transport-native-unix-common netty-tcnative"

log() { echo "[run_conformance] $*" >&2; }

tcnative_dir() { dirname "$(dpkg -L libnetty-tcnative-jni 2>/dev/null | grep -m1 'libnetty-tcnative\.so$')"; }

have_toolchain() {
  command -v javac >/dev/null 2>&1 && command -v protoc >/dev/null 2>&1 && [ -x /usr/bin/grpc_java_plugin ] || return 1
  [ -f "$(tcnative_dir)/libnetty-tcnative.so" ] || return 1
  local jar
  for jar in $RUNTIME_JARS; do [ -f "$JARS/$jar.jar" ] || return 1; done
}

install_toolchain() {
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
      log "SKIP: the Java toolchain is missing and there is no root/sudo to apt-get install: $PACKAGES"; exit 77; fi
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    log "SKIP: the Java toolchain is missing and apt-get is not available (install: $PACKAGES)"; exit 77
  fi
  log "installing $PACKAGES"
  # shellcheck disable=SC2086
  if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends $PACKAGES >&2; then
    DEBIAN_FRONTEND=noninteractive $sudo apt-get update -q >&2 || true
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends $PACKAGES >&2 || {
      log "SKIP: apt-get could not install $PACKAGES"; exit 77; }
  fi
}

have_toolchain || install_toolchain
have_toolchain || { log "SKIP: toolchain still incomplete after apt-get install"; exit 77; }

CLASSPATH_RUNTIME=""
for jar in $RUNTIME_JARS; do CLASSPATH_RUNTIME="$CLASSPATH_RUNTIME:$JARS/$jar.jar"; done
CLASSPATH_RUNTIME="${CLASSPATH_RUNTIME#:}"

PROTO="$ROOT/protos/comigs/sync/v1/sync.proto"
CORE_SRC="$ROOT/android_demo/core/src/main/java"
HARNESS_SRC="$HERE/src"
stamp() {
  { echo "$CLASSPATH_RUNTIME"; javac -version 2>&1; protoc --version; cat "$PROTO" "$0";
    find "$CORE_SRC" "$HARNESS_SRC" -name '*.java' -print0 | sort -z | xargs -0 cat; } | sha256sum | cut -d' ' -f1
}
WANT="$(stamp)"
if [ -f "$BUILD/stamp" ] && [ "$(cat "$BUILD/stamp")" = "$WANT" ] && [ -d "$BUILD/classes" ]; then
  log "up to date: $BUILD"
else
  log "building into $BUILD"
  rm -rf "$BUILD.tmp" && mkdir -p "$BUILD.tmp/gen" "$BUILD.tmp/classes"
  protoc -I"$ROOT/protos" --plugin=protoc-gen-grpc-java=/usr/bin/grpc_java_plugin \
    --java_out="$BUILD.tmp/gen" --grpc-java_out="$BUILD.tmp/gen" comigs/sync/v1/sync.proto
  # grpc-java 1.41's plugin annotates with javax.annotation.Generated, which Java 11+ no longer ships
  # (and the plugin has no option to omit it here): drop the annotation, it has no runtime meaning.
  perl -0pi -e 's/\@javax\.annotation\.Generated\([^)]*\)\n//g' "$BUILD.tmp/gen/dev/comigs/sync/v1/SyncServiceGrpc.java"
  find "$BUILD.tmp/gen" "$CORE_SRC" "$HARNESS_SRC" -name '*.java' > "$BUILD.tmp/sources.txt"
  javac --release 17 -nowarn -encoding UTF-8 -cp "$CLASSPATH_RUNTIME:$JARS/jsr305.jar" \
    -d "$BUILD.tmp/classes" @"$BUILD.tmp/sources.txt" 2>&1 | grep -v '^Note:' >&2 || true
  [ -f "$BUILD.tmp/classes/dev/comigs/edge/harness/ConformanceDevice.class" ] || { log "javac failed"; exit 1; }
  echo "$WANT" > "$BUILD.tmp/stamp"
  rm -rf "$BUILD" && mv "$BUILD.tmp" "$BUILD"
fi
echo "$BUILD/classes:$CLASSPATH_RUNTIME" > "$BUILD/classpath.txt"
# Debian names the JNI library libnetty-tcnative.so; netty looks for libnetty_tcnative.so, and tcnative
# refuses to run from a symlink with another name, so a copy under the expected name goes on the path.
mkdir -p "$BUILD/native"
cmp -s "$(tcnative_dir)/libnetty-tcnative.so" "$BUILD/native/libnetty_tcnative.so" ||
  cp "$(tcnative_dir)/libnetty-tcnative.so" "$BUILD/native/libnetty_tcnative.so"
echo "$BUILD/native" > "$BUILD/library-path.txt"

if [ "${1:-}" = "--build-only" ]; then
  # line 1: java.library.path (netty-tcnative's JNI library), line 2: the runtime classpath
  cat "$BUILD/library-path.txt" "$BUILD/classpath.txt"
  exit 0
fi
cd "$ROOT"
exec "${PYTHON:-python3}" -m pytest tests/android -q "$@"
