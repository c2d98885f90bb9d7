package dev.comigs.edge.core;

import java.math.BigInteger;
import java.util.ArrayList;
import java.util.Comparator;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;

/**
 * A small, strict JSON reader and writer (no dependencies, so `core` stays plain Java).
 *
 * <p>Objects become {@link LinkedHashMap} (duplicate keys are refused, like the coordinator's payload
 * reader), arrays {@link List}, integers {@link Long} (or {@link BigInteger} when too large), other numbers
 * {@link Double}. The writer is canonical in the way Python's {@code json.dumps(sort_keys=True,
 * separators=(",", ":"), ensure_ascii=True)} is: keys sorted by code point, no spaces, everything outside
 * printable ASCII escaped as lowercase {@code \\uXXXX}.
 */
public final class Json {
  private Json() {}

  /** Python's sorted() order for str: by Unicode code point (not UTF-16 unit). */
  public static final Comparator<String> CODE_POINT_ORDER =
      (a, b) -> {
        int i = 0;
        int j = 0;
        while (i < a.length() && j < b.length()) {
          int ca = a.codePointAt(i);
          int cb = b.codePointAt(j);
          if (ca != cb) {
            return Integer.compare(ca, cb);
          }
          i += Character.charCount(ca);
          j += Character.charCount(cb);
        }
        return Integer.compare(a.length() - i, b.length() - j);
      };

  public static final class ParseException extends Exception {
    public ParseException(String message) {
      super(message);
    }
  }

  public static Object parse(String text) throws ParseException {
    Parser parser = new Parser(text);
    parser.skipWs();
    Object value = parser.value(0);
    parser.skipWs();
    if (parser.pos != text.length()) {
      throw new ParseException("extra data at character " + parser.pos);
    }
    return value;
  }

  private static final class Parser {
    final String s;
    int pos;

    Parser(String s) {
      this.s = s;
    }

    void skipWs() {
      while (pos < s.length()) {
        char c = s.charAt(pos);
        if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
          pos++;
        } else {
          break;
        }
      }
    }

    ParseException error(String what) {
      return new ParseException(what + " at character " + pos);
    }

    Object value(int depth) throws ParseException {
      if (depth > 200) {
        throw error("nesting too deep");
      }
      if (pos >= s.length()) {
        throw error("unexpected end of input");
      }
      char c = s.charAt(pos);
      switch (c) {
        case '{':
          return object(depth);
        case '[':
          return array(depth);
        case '"':
          return string();
        case 't':
          return literal("true", Boolean.TRUE);
        case 'f':
          return literal("false", Boolean.FALSE);
        case 'n':
          return literal("null", null);
        default:
          if (c == '-' || (c >= '0' && c <= '9')) {
            return number();
          }
          throw error("unexpected character '" + c + "'");
      }
    }

    Object literal(String word, Object value) throws ParseException {
      if (!s.startsWith(word, pos)) {
        throw error("invalid literal");
      }
      pos += word.length();
      return value;
    }

    Map<String, Object> object(int depth) throws ParseException {
      pos++;
      Map<String, Object> map = new LinkedHashMap<>();
      skipWs();
      if (pos < s.length() && s.charAt(pos) == '}') {
        pos++;
        return map;
      }
      while (true) {
        skipWs();
        if (pos >= s.length() || s.charAt(pos) != '"') {
          throw error("expected a string key");
        }
        String key = string();
        skipWs();
        expect(':');
        skipWs();
        Object value = value(depth + 1);
        if (map.containsKey(key)) {
          throw error("duplicate key \"" + key + "\"");
        }
        map.put(key, value);
        skipWs();
        if (pos < s.length() && s.charAt(pos) == ',') {
          pos++;
          continue;
        }
        expect('}');
        return map;
      }
    }

    List<Object> array(int depth) throws ParseException {
      pos++;
      List<Object> list = new ArrayList<>();
      skipWs();
      if (pos < s.length() && s.charAt(pos) == ']') {
        pos++;
        return list;
      }
      while (true) {
        skipWs();
        list.add(value(depth + 1));
        skipWs();
        if (pos < s.length() && s.charAt(pos) == ',') {
          pos++;
          continue;
        }
        expect(']');
        return list;
      }
    }

    void expect(char c) throws ParseException {
      if (pos >= s.length() || s.charAt(pos) != c) {
        throw error("expected '" + c + "'");
      }
      pos++;
    }

    String string() throws ParseException {
      pos++;
      StringBuilder out = new StringBuilder();
      while (true) {
        if (pos >= s.length()) {
          throw error("unterminated string");
        }
        char c = s.charAt(pos++);
        if (c == '"') {
          return out.toString();
        }
        if (c < 0x20) {
          throw error("control character in string");
        }
        if (c != '\\') {
          out.append(c);
          continue;
        }
        if (pos >= s.length()) {
          throw error("unterminated escape");
        }
        char e = s.charAt(pos++);
        switch (e) {
          case '"':
            out.append('"');
            break;
          case '\\':
            out.append('\\');
            break;
          case '/':
            out.append('/');
            break;
          case 'b':
            out.append('\b');
            break;
          case 'f':
            out.append('\f');
            break;
          case 'n':
            out.append('\n');
            break;
          case 'r':
            out.append('\r');
            break;
          case 't':
            out.append('\t');
            break;
          case 'u':
            if (pos + 4 > s.length()) {
              throw error("short \\u escape");
            }
            try {
              out.append((char) Integer.parseInt(s.substring(pos, pos + 4), 16));
            } catch (NumberFormatException ex) {
              throw error("bad \\u escape");
            }
            pos += 4;
            break;
          default:
            throw error("bad escape \\" + e);
        }
      }
    }

    Object number() throws ParseException {
      int start = pos;
      if (s.charAt(pos) == '-') {
        pos++;
      }
      boolean integral = true;
      while (pos < s.length()) {
        char c = s.charAt(pos);
        if (c >= '0' && c <= '9') {
          pos++;
        } else if (c == '.' || c == 'e' || c == 'E' || c == '+' || c == '-') {
          integral = false;
          pos++;
        } else {
          break;
        }
      }
      String text = s.substring(start, pos);
      try {
        if (integral) {
          BigInteger big = new BigInteger(text);
          return big.bitLength() < 64 ? (Object) big.longValue() : big;
        }
        return Double.parseDouble(text);
      } catch (NumberFormatException ex) {
        throw error("bad number '" + text + "'");
      }
    }
  }

  // ------------------------------------------------------------------------------------ writing

  /** Canonical form: sorted keys, no whitespace, ASCII only. */
  public static String write(Object value) {
    StringBuilder out = new StringBuilder();
    write(out, value);
    return out.toString();
  }

  @SuppressWarnings("unchecked")
  private static void write(StringBuilder out, Object value) {
    if (value == null) {
      out.append("null");
    } else if (value instanceof String) {
      quote(out, (String) value);
    } else if (value instanceof Boolean) {
      out.append(((Boolean) value) ? "true" : "false");
    } else if (value instanceof Long
        || value instanceof Integer
        || value instanceof Short
        || value instanceof BigInteger) {
      out.append(value.toString());
    } else if (value instanceof Double || value instanceof Float) {
      double d = ((Number) value).doubleValue();
      if (Double.isNaN(d) || Double.isInfinite(d)) {
        throw new IllegalArgumentException("JSON cannot hold " + d);
      }
      out.append(Double.toString(d));
    } else if (value instanceof Map) {
      TreeMap<String, Object> sorted = new TreeMap<>(CODE_POINT_ORDER);
      sorted.putAll((Map<String, Object>) value);
      out.append('{');
      boolean first = true;
      for (Map.Entry<String, Object> entry : sorted.entrySet()) {
        if (!first) {
          out.append(',');
        }
        first = false;
        quote(out, entry.getKey());
        out.append(':');
        write(out, entry.getValue());
      }
      out.append('}');
    } else if (value instanceof List) {
      out.append('[');
      boolean first = true;
      for (Object item : (List<Object>) value) {
        if (!first) {
          out.append(',');
        }
        first = false;
        write(out, item);
      }
      out.append(']');
    } else if (value instanceof long[]) {
      out.append('[');
      long[] array = (long[]) value;
      for (int i = 0; i < array.length; i++) {
        if (i > 0) {
          out.append(',');
        }
        out.append(array[i]);
      }
      out.append(']');
    } else {
      throw new IllegalArgumentException("cannot write " + value.getClass() + " as JSON");
    }
  }

  /** Python json's ensure_ascii quoting: \" \\ \n \r \t \b \f, other non-printable-ASCII as \\uxxxx. */
  static void quote(StringBuilder out, String s) {
    out.append('"');
    for (int i = 0; i < s.length(); i++) {
      char c = s.charAt(i);
      switch (c) {
        case '"':
          out.append("\\\"");
          break;
        case '\\':
          out.append("\\\\");
          break;
        case '\n':
          out.append("\\n");
          break;
        case '\r':
          out.append("\\r");
          break;
        case '\t':
          out.append("\\t");
          break;
        case '\b':
          out.append("\\b");
          break;
        case '\f':
          out.append("\\f");
          break;
        default:
          if (c >= 0x20 && c <= 0x7e) {
            out.append(c);
          } else {
            out.append(String.format("\\u%04x", (int) c));
          }
      }
    }
    out.append('"');
  }

  // ------------------------------------------------------------------------------------ access helpers

  @SuppressWarnings("unchecked")
  public static Map<String, Object> asObject(Object value, String what) {
    if (!(value instanceof Map)) {
      throw new IllegalArgumentException(what + " must be a JSON object");
    }
    return (Map<String, Object>) value;
  }

  @SuppressWarnings("unchecked")
  public static List<Object> asList(Object value, String what) {
    if (!(value instanceof List)) {
      throw new IllegalArgumentException(what + " must be a JSON array");
    }
    return (List<Object>) value;
  }

  public static long asLong(Object value, String what) {
    if (!(value instanceof Long)) {
      throw new IllegalArgumentException(what + " must be an integer");
    }
    return (Long) value;
  }

  public static String asString(Object value, String what) {
    if (!(value instanceof String)) {
      throw new IllegalArgumentException(what + " must be a string");
    }
    return (String) value;
  }
}
