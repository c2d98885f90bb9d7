package dev.comigs.edge.core;

import java.util.Arrays;

/** A named tensor's shape and float32 values (row-major), as the sync protocol sees it. */
public final class Tensor {
  private final long[] shape;
  private final float[] values;

  public Tensor(long[] shape, float[] values) {
    long count = numel(shape);
    if (count != values.length) {
      throw new IllegalArgumentException(
          "shape " + Arrays.toString(shape) + " needs " + count + " values, got " + values.length);
    }
    this.shape = shape.clone();
    this.values = values;
  }

  public static long numel(long[] shape) {
    long count = 1;
    for (long d : shape) {
      if (d < 0) {
        throw new IllegalArgumentException("negative dimension in " + Arrays.toString(shape));
      }
      count = Math.multiplyExact(count, d);
    }
    return count;
  }

  public long[] shape() {
    return shape.clone();
  }

  /** The live values array (not a copy). */
  public float[] values() {
    return values;
  }

  public Tensor copy() {
    return new Tensor(shape, values.clone());
  }

  public boolean sameShape(long[] other) {
    return Arrays.equals(shape, other);
  }

  @Override
  public String toString() {
    return "Tensor" + Arrays.toString(shape);
  }
}
