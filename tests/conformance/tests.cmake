# Conformance against llama.cpp (node-llama-cpp, third_party/npm), include()d from
# tests/CMakeLists.txt, where MOE_CLI is $<TARGET_FILE:moe>.
#
# The scripts need numpy: prefer a python3 on PATH that has it, else Debian's
# /usr/bin/python3 (python3-numpy), since a pyenv shim may shadow it.
set(_conf_dir ${CMAKE_SOURCE_DIR}/tests/conformance)
find_program(MOE_CONF_PYTHON NAMES python3)
if(MOE_CONF_PYTHON)
  execute_process(COMMAND ${MOE_CONF_PYTHON} -c "import numpy"
                  RESULT_VARIABLE _conf_np OUTPUT_QUIET ERROR_QUIET)
  if(NOT _conf_np EQUAL 0 AND EXISTS /usr/bin/python3)
    set(MOE_CONF_PYTHON /usr/bin/python3 CACHE FILEPATH "python3 with numpy for conformance tests" FORCE)
  endif()
else()
  set(MOE_CONF_PYTHON /usr/bin/python3)
endif()

# moe CLI vs llama.cpp: F32 token-for-token, F16/BF16 and quantized distributions.
add_test(NAME conformance
         COMMAND ${MOE_CONF_PYTHON} ${_conf_dir}/run_conformance.py --moe ${MOE_CLI})
set_tests_properties(conformance PROPERTIES TIMEOUT 900)

# The numpy reference forward (ref_forward.py) vs llama.cpp on tiny_gguf.py models:
# checks our reading of llama.cpp's conventions and the oracle itself.
add_test(NAME conformance_numpy_ref
         COMMAND ${MOE_CONF_PYTHON} ${_conf_dir}/check_numpy_ref.py)
set_tests_properties(conformance_numpy_ref PROPERTIES TIMEOUT 300)

# moe quantize vs llama.cpp's llama_model_quantize: the same type for every tensor under every
# mix, and byte-identical tensor data.
add_test(NAME conformance_quantize
         COMMAND ${MOE_CONF_PYTHON} ${_conf_dir}/quantize_oracle.py --moe ${MOE_CLI})
set_tests_properties(conformance_quantize PROPERTIES TIMEOUT 600)
