# PyTorch goldens (tests/golden/moe_torch.py), include()d from tests/CMakeLists.txt. The script
# needs torch: Debian's python3-torch lives under /usr/bin/python3 (a pyenv python3 on PATH
# usually lacks it). The self-test checks the script itself: autograd vs central differences at
# a fixed routing, a scalar per-token loop, capacity dropping order, expert choice, groups.
# The C++ layer's comparison against the goldens is registered with tests/moe.
add_test(NAME golden_torch_selftest
         COMMAND /usr/bin/python3 ${CMAKE_SOURCE_DIR}/tests/golden/moe_torch.py --selftest)
set_tests_properties(golden_torch_selftest PROPERTIES TIMEOUT 120)
# The whole-model golden (tests/golden/model_torch.py) checks itself: autograd against central
# differences, logits against the numpy reference forward (itself checked against llama.cpp),
# AdamW's first step in closed form. tests/train/golden_test.cc compares moe.cpp with it.
add_test(NAME golden_model_selftest
         COMMAND /usr/bin/python3 ${CMAKE_SOURCE_DIR}/tests/golden/model_torch.py --selftest)
set_tests_properties(golden_model_selftest PROPERTIES TIMEOUT 300)
