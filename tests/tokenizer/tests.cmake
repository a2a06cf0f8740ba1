# The tokenizer against llama.cpp on the real vocabularies llama.cpp tests itself with
# (models/ggml-vocab-*.gguf, unpacked from node-llama-cpp's bundled llama.cpp source). Slower than
# the synthetic-vocabulary suite that the plain "tokenizer" test runs, so registered on its own.
if(TARGET test_tokenizer)
  add_test(NAME tokenizer_real_vocabs
           COMMAND test_tokenizer --gtest_filter=Llama/RealVocabTest.*:RealVocab.*)
  set_tests_properties(tokenizer_real_vocabs PROPERTIES
      ENVIRONMENT "MOE_TOKENIZER_REAL_VOCABS=1;MOE_TEST_TMP=${CMAKE_BINARY_DIR}/test_tmp"
      TIMEOUT 300)
endif()
