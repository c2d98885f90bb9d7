package dev.comigs.edge.core;

/** Text generation with the current experts (the app: ExecuTorch inference program + tokenizer). */
public interface Generator {
  String generate(String prompt, int maxNewTokens) throws Exception;
}
