package dev.comigs.edge.core;

import java.util.Locale;

/** Wire encodings of a delta (sync.proto `Encoding`, sync_service/encoding.py). */
public enum Encoding {
  FP32("fp32", "F32", 1),
  FP16("fp16", "F16", 2),
  INT8("int8", "I8", 3);

  /** The name used by the Python client and the coordinator's logs. */
  public final String wireName;
  /** safetensors dtype of the value tensors. */
  public final String dtype;
  /** sync.proto enum number. */
  public final int protoNumber;

  Encoding(String wireName, String dtype, int protoNumber) {
    this.wireName = wireName;
    this.dtype = dtype;
    this.protoNumber = protoNumber;
  }

  public static Encoding fromName(String name) {
    for (Encoding e : values()) {
      if (e.wireName.equals(name.toLowerCase(Locale.ROOT))) {
        return e;
      }
    }
    throw new IllegalArgumentException("encoding must be one of fp32, fp16, int8, got '" + name + "'");
  }

  public static Encoding fromProtoNumber(int number) {
    for (Encoding e : values()) {
      if (e.protoNumber == number) {
        return e;
      }
    }
    return null;
  }
}
