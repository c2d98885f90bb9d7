package dev.comigs.edge.core;

import java.util.Arrays;
import java.util.Map;
import java.util.TreeMap;

/** Generalist deltas: trained minus downloaded, over exactly the coordinator's manifest. */
public final class Deltas {
  private Deltas() {}

  /** Check that named tensors are exactly the manifest (names and shapes). */
  public static void checkManifest(Map<String, Tensor> tensors, Map<String, long[]> manifest, String what)
      throws ComigsException {
    for (Map.Entry<String, long[]> spec : manifest.entrySet()) {
      Tensor t = tensors.get(spec.getKey());
      if (t == null) {
        throw new ComigsException(ComigsException.Kind.INVALID, what + " lacks manifest tensor '" + spec.getKey() + "'");
      }
      if (!t.sameShape(spec.getValue())) {
        throw new ComigsException(ComigsException.Kind.INVALID, what + ": tensor '" + spec.getKey() + "' has shape "
            + Arrays.toString(t.shape()) + ", the manifest says " + Arrays.toString(spec.getValue()));
      }
    }
    for (String name : tensors.keySet()) {
      if (!manifest.containsKey(name)) {
        throw new ComigsException(ComigsException.Kind.INVALID, what + " has tensor '" + name
            + "' that is not in the coordinator's manifest (only generalists may leave the device)");
      }
    }
  }

  /** delta = trained - base, element-wise in float32, for every manifest tensor; refuses non-finite values. */
  public static Map<String, Tensor> compute(Map<String, Tensor> base, Map<String, Tensor> trained,
      Map<String, long[]> manifest) throws ComigsException {
    checkManifest(base, manifest, "the downloaded generalist");
    checkManifest(trained, manifest, "the trained generalist");
    Map<String, Tensor> delta = new TreeMap<>(Json.CODE_POINT_ORDER);
    for (String name : manifest.keySet()) {
      float[] b = base.get(name).values();
      float[] t = trained.get(name).values();
      float[] d = new float[b.length];
      for (int i = 0; i < d.length; i++) {
        d[i] = t[i] - b[i];
        if (Float.isNaN(d[i]) || Float.isInfinite(d[i])) {
          throw new ComigsException(ComigsException.Kind.INVALID,
              "training produced a non-finite value in '" + name + "'; nothing was uploaded");
        }
      }
      delta.put(name, new Tensor(base.get(name).shape(), d));
    }
    return delta;
  }
}
