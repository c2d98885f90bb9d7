package dev.comigs.edge.core;

import java.io.ByteArrayOutputStream;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;

/**
 * The "comigs tensor payload" format (comigs-tensors/1), byte for byte what sync_service/encoding.py
 * writes: a safetensors file with a canonical header (sorted keys, compact ASCII JSON, space padding so
 * the data starts at a multiple of 8), tensors laid out in sorted-name order, little-endian.
 *
 * <ul>
 *   <li>fp32: every tensor F32;
 *   <li>fp16: every tensor F16, round-to-nearest-even, |x| must be at most 65504;
 *   <li>int8: I8 values plus a F32 tensor "name:scale": {@code scale = float32(max|x|) / 127} in float32,
 *       {@code q = clip(rint(x / scale), -127, 127)} (ties to even), q = 0 where scale = 0. "auto"
 *       granularity: one scale per row (last axis) when the tensor has >= 2 dims and rows of >= 64 values,
 *       else one scale per tensor.
 * </ul>
 */
public final class TensorPayload {
  public static final String FORMAT = "comigs-tensors/1";
  public static final String SCALE_SUFFIX = ":scale";
  public static final int AUTO_ROW_MIN_LENGTH = 64;
  public static final long MAX_HEADER_BYTES = 1L << 20;
  private static final float FP16_MAX = 65504f;

  public enum Int8Granularity {
    AUTO,
    TENSOR,
    ROW
  }

  private TensorPayload() {}

  private static final class Spec {
    final String name;
    final String dtype;
    final long[] shape;

    Spec(String name, String dtype, long[] shape) {
      this.name = name;
      this.dtype = dtype;
      this.shape = shape;
    }
  }

  static int itemSize(String dtype) {
    switch (dtype) {
      case "F64":
      case "I64":
        return 8;
      case "F32":
      case "I32":
        return 4;
      case "F16":
      case "BF16":
      case "I16":
        return 2;
      case "I8":
      case "U8":
      case "BOOL":
        return 1;
      default:
        throw new IllegalArgumentException("unknown dtype " + dtype);
    }
  }

  public static long[] int8ScaleShape(long[] shape, Int8Granularity granularity) {
    boolean row =
        granularity == Int8Granularity.ROW
            || (granularity == Int8Granularity.AUTO
                && shape.length >= 2
                && shape[shape.length - 1] >= AUTO_ROW_MIN_LENGTH);
    return row && shape.length >= 1 ? Arrays.copyOf(shape, shape.length - 1) : new long[0];
  }

  /** The canonical 8-byte length + padded JSON header for specs laid out in the given order. */
  private static byte[] buildHeader(List<Spec> specs, Map<String, String> metadata) {
    Map<String, Object> header = new LinkedHashMap<>();
    if (metadata != null && !metadata.isEmpty()) {
      header.put("__metadata__", new LinkedHashMap<String, Object>(metadata));
    }
    long offset = 0;
    for (Spec spec : specs) {
      long nbytes = Math.multiplyExact(Tensor.numel(spec.shape), itemSize(spec.dtype));
      Map<String, Object> entry = new LinkedHashMap<>();
      entry.put("dtype", spec.dtype);
      entry.put("shape", spec.shape);
      entry.put("data_offsets", new long[] {offset, offset + nbytes});
      header.put(spec.name, entry);
      offset += nbytes;
    }
    StringBuilder text = new StringBuilder(Json.write(header));
    while ((8 + text.length()) % 8 != 0) {
      text.append(' ');
    }
    byte[] json = text.toString().getBytes(StandardCharsets.US_ASCII);
    ByteBuffer out = ByteBuffer.allocate(8 + json.length).order(ByteOrder.LITTLE_ENDIAN);
    out.putLong(json.length);
    out.put(json);
    return out.array();
  }

  public static byte[] encode(Map<String, Tensor> tensors, Encoding encoding) throws ComigsException {
    return encode(tensors, encoding, Int8Granularity.AUTO, null);
  }

  /** Encode named float tensors as one canonical payload (identical to Python's `encoding.encode`). */
  public static byte[] encode(
      Map<String, Tensor> tensors,
      Encoding encoding,
      Int8Granularity granularity,
      Map<String, String> extraMetadata)
      throws ComigsException {
    TreeMap<String, Tensor> sorted = new TreeMap<>(Json.CODE_POINT_ORDER);
    sorted.putAll(tensors);
    List<Spec> specs = new ArrayList<>();
    for (Map.Entry<String, Tensor> entry : sorted.entrySet()) {
      String name = entry.getKey();
      if (name.endsWith(SCALE_SUFFIX)) {
        throw invalid("tensor name '" + name + "' may not end in '" + SCALE_SUFFIX + "'");
      }
      long[] shape = entry.getValue().shape();
      specs.add(new Spec(name, encoding.dtype, shape));
      if (encoding == Encoding.INT8) {
        specs.add(new Spec(name + SCALE_SUFFIX, "F32", int8ScaleShape(shape, granularity)));
      }
    }
    specs.sort((a, b) -> Json.CODE_POINT_ORDER.compare(a.name, b.name));
    Map<String, String> meta = new TreeMap<>();
    meta.put("format", FORMAT);
    meta.put("encoding", encoding.wireName);
    if (extraMetadata != null) {
      meta.putAll(extraMetadata);
    }
    ByteArrayOutputStream out = new ByteArrayOutputStream();
    out.writeBytes(buildHeader(specs, meta));
    Map<String, float[]> pendingScales = new TreeMap<>();
    for (Spec spec : specs) {
      if (spec.name.endsWith(SCALE_SUFFIX)) {
        out.writeBytes(floatsLE(pendingScales.remove(spec.name)));
        continue;
      }
      Tensor tensor = sorted.get(spec.name);
      float[] values = tensor.values();
      switch (encoding) {
        case FP32:
          out.writeBytes(floatsLE(values));
          break;
        case FP16:
          {
            ByteBuffer buffer = ByteBuffer.allocate(values.length * 2).order(ByteOrder.LITTLE_ENDIAN);
            for (float v : values) {
              if (Math.abs(v) > FP16_MAX) {
                throw invalid(
                    "tensor '" + spec.name + "' has values beyond the float16 range; send fp32");
              }
              buffer.putShort(floatToHalf(v));
            }
            out.writeBytes(buffer.array());
            break;
          }
        case INT8:
          {
            byte[] q = new byte[values.length];
            long[] scaleShape = int8ScaleShape(spec.shape, granularity);
            float[] scales = quantizeInt8(spec.name, spec.shape, values, scaleShape.length > 0, q);
            pendingScales.put(spec.name + SCALE_SUFFIX, scales);
            out.writeBytes(q);
            break;
          }
        default:
          throw new IllegalStateException();
      }
    }
    return out.toByteArray();
  }

  private static ComigsException invalid(String message) {
    return new ComigsException(ComigsException.Kind.INVALID, message);
  }

  private static byte[] floatsLE(float[] values) {
    ByteBuffer buffer = ByteBuffer.allocate(values.length * 4).order(ByteOrder.LITTLE_ENDIAN);
    for (float v : values) {
      buffer.putFloat(v);
    }
    return buffer.array();
  }

  /**
   * Symmetric int8 quantisation in float32 arithmetic (numpy's): per row when {@code perRow}, else one
   * scale. Fills {@code q}; returns the scales.
   */
  static float[] quantizeInt8(String name, long[] shape, float[] x, boolean perRow, byte[] q)
      throws ComigsException {
    for (float v : x) {
      if (Float.isNaN(v) || Float.isInfinite(v)) {
        throw invalid("tensor '" + name + "': cannot quantise non-finite values to int8");
      }
    }
    if (!perRow) {
      float amax = 0f;
      for (float v : x) {
        amax = Math.max(amax, Math.abs(v));
      }
      float scale = amax / 127f;
      quantizeRange(x, 0, x.length, scale, q);
      return new float[] {scale};
    }
    int rowLength = (int) shape[shape.length - 1];
    int rows = rowLength == 0 ? (int) Tensor.numel(Arrays.copyOf(shape, shape.length - 1)) : x.length / rowLength;
    float[] scales = new float[rows];
    for (int r = 0; r < rows; r++) {
      int begin = r * rowLength;
      float amax = 0f;
      for (int i = begin; i < begin + rowLength; i++) {
        amax = Math.max(amax, Math.abs(x[i]));
      }
      scales[r] = amax / 127f;
      quantizeRange(x, begin, begin + rowLength, scales[r], q);
    }
    return scales;
  }

  private static void quantizeRange(float[] x, int begin, int end, float scale, byte[] q) {
    float divisor = scale > 0f ? scale : 1f;
    for (int i = begin; i < end; i++) {
      float ratio = x[i] / divisor; // float32 division, as numpy does
      double rounded = Math.rint(ratio); // round half to even
      rounded = Math.max(-127.0, Math.min(127.0, rounded));
      q[i] = (byte) (int) rounded;
    }
  }

  /** float32 -> IEEE binary16 bits, round to nearest even (numpy's astype(float16)). */
  public static short floatToHalf(float f) {
    int bits = Float.floatToRawIntBits(f);
    int sign = (bits >>> 16) & 0x8000;
    int exp = (bits >>> 23) & 0xff;
    int mant = bits & 0x7fffff;
    if (exp == 0xff) {
      return (short) (sign | 0x7c00 | (mant != 0 ? 0x200 | (mant >>> 13) : 0));
    }
    int e = exp - 127 + 15;
    if (e >= 0x1f) {
      return (short) (sign | 0x7c00);
    }
    if (e <= 0) {
      if (e < -10) {
        return (short) sign;
      }
      int full = mant | 0x800000;
      int shift = 14 - e;
      int half = full >>> shift;
      int rem = full & ((1 << shift) - 1);
      int mid = 1 << (shift - 1);
      if (rem > mid || (rem == mid && (half & 1) != 0)) {
        half++;
      }
      return (short) (sign | half);
    }
    int half = (e << 10) | (mant >>> 13);
    int rem = mant & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (half & 1) != 0)) {
      half++;
    }
    return (short) (sign | half);
  }

  /** IEEE binary16 bits -> float32 (exact). */
  public static float halfToFloat(short h) {
    int bits = h & 0xffff;
    int sign = (bits & 0x8000) << 16;
    int exp = (bits >>> 10) & 0x1f;
    int mant = bits & 0x3ff;
    if (exp == 0) {
      if (mant == 0) {
        return Float.intBitsToFloat(sign);
      }
      float value = mant * 0x1p-24f;
      return sign != 0 ? -value : value;
    }
    if (exp == 0x1f) {
      return Float.intBitsToFloat(sign | 0x7f800000 | (mant << 13));
    }
    return Float.intBitsToFloat(sign | ((exp - 15 + 127) << 23) | (mant << 13));
  }

  // ------------------------------------------------------------------------------------ decoding

  /** One parsed header entry. */
  public static final class Entry {
    public final String name;
    public final String dtype;
    public final long[] shape;
    public final long begin;
    public final long end;

    Entry(String name, String dtype, long[] shape, long begin, long end) {
      this.name = name;
      this.dtype = dtype;
      this.shape = shape;
      this.begin = begin;
      this.end = end;
    }
  }

  /** Parse and structurally check a whole payload's header (same rules as the coordinator). */
  public static List<Entry> parseHeader(byte[] payload, Map<String, String> metadataOut)
      throws ComigsException {
    if (payload.length < 8) {
      throw invalid("payload is " + payload.length + " bytes, too short for a header");
    }
    long length = ByteBuffer.wrap(payload, 0, 8).order(ByteOrder.LITTLE_ENDIAN).getLong();
    if (length < 2 || length > MAX_HEADER_BYTES || 8 + length > payload.length) {
      throw invalid("payload header length " + length + " is invalid");
    }
    String text = new String(payload, 8, (int) length, StandardCharsets.UTF_8);
    Map<String, Object> raw;
    try {
      raw = Json.asObject(Json.parse(text), "payload header");
    } catch (Json.ParseException | IllegalArgumentException ex) {
      throw invalid("payload header is not valid JSON: " + ex.getMessage());
    }
    List<Entry> entries = new ArrayList<>();
    for (Map.Entry<String, Object> item : raw.entrySet()) {
      String name = item.getKey();
      if (name.equals("__metadata__")) {
        for (Map.Entry<String, Object> meta : Json.asObject(item.getValue(), "__metadata__").entrySet()) {
          if (!(meta.getValue() instanceof String)) {
            throw invalid("payload header __metadata__ must be an object of strings");
          }
          if (metadataOut != null) {
            metadataOut.put(meta.getKey(), (String) meta.getValue());
          }
        }
        continue;
      }
      try {
        Map<String, Object> info = Json.asObject(item.getValue(), "tensor '" + name + "'");
        if (!info.keySet().equals(java.util.Set.of("dtype", "shape", "data_offsets"))) {
          throw invalid("tensor '" + name + "': header entry must have exactly dtype, shape and data_offsets");
        }
        String dtype = Json.asString(info.get("dtype"), "dtype");
        itemSize(dtype);
        List<Object> shapeList = Json.asList(info.get("shape"), "shape");
        long[] shape = new long[shapeList.size()];
        for (int i = 0; i < shape.length; i++) {
          shape[i] = Json.asLong(shapeList.get(i), "shape");
          if (shape[i] < 0) {
            throw invalid("tensor '" + name + "': negative dimension");
          }
        }
        List<Object> offsets = Json.asList(info.get("data_offsets"), "data_offsets");
        if (offsets.size() != 2) {
          throw invalid("tensor '" + name + "': data_offsets must be [begin, end]");
        }
        long begin = Json.asLong(offsets.get(0), "data_offsets");
        long end = Json.asLong(offsets.get(1), "data_offsets");
        if (end - begin != Tensor.numel(shape) * itemSize(dtype) || begin < 0) {
          throw invalid("tensor '" + name + "': data_offsets do not match " + dtype + Arrays.toString(shape));
        }
        entries.add(new Entry(name, dtype, shape, begin, end));
      } catch (IllegalArgumentException | ArithmeticException ex) {
        throw invalid("tensor '" + name + "': " + ex.getMessage());
      }
    }
    entries.sort((a, b) -> a.begin != b.begin ? Long.compare(a.begin, b.begin) : Long.compare(a.end, b.end));
    long position = 0;
    for (Entry entry : entries) {
      if (entry.begin != position) {
        throw invalid("tensor '" + entry.name + "': data_offsets leave a gap or overlap at byte " + position);
      }
      position = entry.end;
    }
    if (8 + length + position != payload.length) {
      throw invalid(
          "payload is " + payload.length + " bytes but its header describes " + (8 + length + position));
    }
    return entries;
  }

  /** Decode a whole payload to float32 tensors (dequantising int8 with its scales), like Python's decode. */
  public static Map<String, Tensor> decode(byte[] payload) throws ComigsException {
    List<Entry> entries = parseHeader(payload, null);
    long length = ByteBuffer.wrap(payload, 0, 8).order(ByteOrder.LITTLE_ENDIAN).getLong();
    int dataStart = (int) (8 + length);
    Map<String, Entry> byName = new TreeMap<>(Json.CODE_POINT_ORDER);
    for (Entry e : entries) {
      byName.put(e.name, e);
    }
    Map<String, Tensor> result = new TreeMap<>(Json.CODE_POINT_ORDER);
    for (Entry entry : byName.values()) {
      if (entry.name.endsWith(SCALE_SUFFIX)) {
        if (!byName.containsKey(entry.name.substring(0, entry.name.length() - SCALE_SUFFIX.length()))) {
          throw invalid("scale tensor '" + entry.name + "' has no value tensor");
        }
        continue;
      }
      ByteBuffer data =
          ByteBuffer.wrap(payload, dataStart + (int) entry.begin, (int) (entry.end - entry.begin))
              .order(ByteOrder.LITTLE_ENDIAN);
      int count = (int) Tensor.numel(entry.shape);
      float[] values = new float[count];
      switch (entry.dtype) {
        case "F32":
          for (int i = 0; i < count; i++) {
            values[i] = data.getFloat();
          }
          break;
        case "F16":
          for (int i = 0; i < count; i++) {
            values[i] = halfToFloat(data.getShort());
          }
          break;
        case "BF16":
          for (int i = 0; i < count; i++) {
            values[i] = Float.intBitsToFloat((data.getShort() & 0xffff) << 16);
          }
          break;
        case "F64":
          for (int i = 0; i < count; i++) {
            values[i] = (float) data.getDouble();
          }
          break;
        case "I8":
          {
            Entry scaleEntry = byName.get(entry.name + SCALE_SUFFIX);
            if (scaleEntry == null) {
              throw invalid("tensor '" + entry.name + "' is int8 but has no scale");
            }
            long[] rowShape = entry.shape.length > 0 ? Arrays.copyOf(entry.shape, entry.shape.length - 1) : new long[0];
            boolean perRow = scaleEntry.shape.length > 0;
            if (!"F32".equals(scaleEntry.dtype)
                || !(scaleEntry.shape.length == 0 || Arrays.equals(scaleEntry.shape, rowShape))) {
              throw invalid("scale tensor '" + scaleEntry.name + "' must be F32 with shape [] or " + Arrays.toString(rowShape));
            }
            ByteBuffer scaleData =
                ByteBuffer.wrap(payload, dataStart + (int) scaleEntry.begin, (int) (scaleEntry.end - scaleEntry.begin))
                    .order(ByteOrder.LITTLE_ENDIAN);
            int scaleCount = (int) Tensor.numel(scaleEntry.shape);
            float[] scales = new float[scaleCount];
            for (int i = 0; i < scaleCount; i++) {
              scales[i] = scaleData.getFloat();
              if (!(scales[i] >= 0f) || Float.isInfinite(scales[i])) {
                throw invalid("scale tensor '" + scaleEntry.name + "' has a negative or non-finite scale");
              }
            }
            int rowLength = entry.shape.length > 0 ? (int) entry.shape[entry.shape.length - 1] : 1;
            for (int i = 0; i < count; i++) {
              float scale = perRow ? scales[i / Math.max(rowLength, 1)] : scales[0];
              values[i] = (float) data.get() * scale;
            }
            break;
          }
        default:
          throw invalid("tensor '" + entry.name + "': dtype " + entry.dtype + " is not a floating-point type");
      }
      result.put(entry.name, new Tensor(entry.shape, values));
    }
    return result;
  }
}
