# ctest targets of the runtime (included when AUTOLR_BUILD_TESTS=ON).
set(_dir ${CMAKE_CURRENT_SOURCE_DIR})
set(_data ${_dir}/tests/data)

add_executable(test_runtime ${_dir}/tests/test_runtime.cpp)
target_link_libraries(test_runtime PRIVATE autolr)
target_compile_features(test_runtime PRIVATE cxx_std_17)
add_test(NAME runtime_agreement_and_errors COMMAND test_runtime ${_data})

add_test(NAME runtime_step_timing_smoke COMMAND step_timing ${_data}/controller_h16_l1.pt 2000)

add_test(NAME example_train_softmax COMMAND train_softmax ${_data}/controller_h16_l1.pt)

# Can this toolchain build and link with ASan + UBSan?
include(CheckCXXSourceCompiles)
set(CMAKE_REQUIRED_FLAGS "-fsanitize=address,undefined")
set(CMAKE_REQUIRED_LINK_OPTIONS "-fsanitize=address,undefined")
check_cxx_source_compiles("int main() { return 0; }" AUTOLR_HAVE_SANITIZERS)
unset(CMAKE_REQUIRED_FLAGS)
unset(CMAKE_REQUIRED_LINK_OPTIONS)

# The fuzz target: libFuzzer under clang, else a standalone mutation driver with a time budget.
set(_fuzz_src ${_dir}/fuzz/fuzz_reader.cpp)
if(CMAKE_CXX_COMPILER_ID MATCHES "Clang" AND NOT AUTOLR_FUZZ_STANDALONE)
  add_executable(fuzz_reader ${_fuzz_src} ${AUTOLR_SOURCES})
  target_include_directories(fuzz_reader PRIVATE ${AUTOLR_INCLUDE})
  target_compile_options(fuzz_reader PRIVATE -g -fsanitize=fuzzer,address,undefined)
  target_link_options(fuzz_reader PRIVATE -fsanitize=fuzzer,address,undefined)
  add_test(NAME fuzz_reader COMMAND fuzz_reader -max_total_time=${AUTOLR_FUZZ_SECONDS} -seed=1 ${_data})
else()
  add_executable(fuzz_reader ${_fuzz_src} ${_dir}/fuzz/fuzz_driver.cpp ${AUTOLR_SOURCES})
  target_include_directories(fuzz_reader PRIVATE ${AUTOLR_INCLUDE})
  target_compile_features(fuzz_reader PRIVATE cxx_std_17)
  if(AUTOLR_HAVE_SANITIZERS)
    # sanitized whenever possible: a fuzz run without sanitizers finds only hard crashes
    target_compile_options(fuzz_reader PRIVATE -g -O1 -fsanitize=address,undefined -fno-sanitize-recover=all)
    target_link_options(fuzz_reader PRIVATE -fsanitize=address,undefined)
  endif()
  add_test(NAME fuzz_reader COMMAND fuzz_reader ${_data}/controller_h16_l1.pt ${_data}/controller_h7_l2.pt
           --seconds ${AUTOLR_FUZZ_SECONDS} --iterations 200000 --seed 1)
endif()
set_tests_properties(fuzz_reader PROPERTIES TIMEOUT 60)

if(AUTOLR_SANITIZE)
  if(NOT AUTOLR_HAVE_SANITIZERS)
    message(FATAL_ERROR "AUTOLR_SANITIZE=ON but this compiler cannot build with -fsanitize=address,undefined "
                        "(GCC/Clang with libasan/libubsan needed); configure with -DAUTOLR_SANITIZE=OFF")
  endif()
  add_executable(test_runtime_asan ${_dir}/tests/test_runtime.cpp ${AUTOLR_SOURCES})
  target_include_directories(test_runtime_asan PRIVATE ${AUTOLR_INCLUDE})
  target_compile_features(test_runtime_asan PRIVATE cxx_std_17)
  target_compile_options(test_runtime_asan PRIVATE -g -O1 -fsanitize=address,undefined -fno-sanitize-recover=all)
  target_link_options(test_runtime_asan PRIVATE -fsanitize=address,undefined)
  add_test(NAME runtime_agreement_and_errors_asan COMMAND test_runtime_asan ${_data})
  add_executable(train_softmax_asan ${_dir}/examples/train_softmax.c ${AUTOLR_SOURCES})
  target_include_directories(train_softmax_asan PRIVATE ${AUTOLR_INCLUDE})
  target_compile_features(train_softmax_asan PRIVATE cxx_std_17)
  set_target_properties(train_softmax_asan PROPERTIES LINKER_LANGUAGE CXX)
  target_compile_options(train_softmax_asan PRIVATE -g -O1 -fsanitize=address,undefined -fno-sanitize-recover=all)
  target_link_options(train_softmax_asan PRIVATE -fsanitize=address,undefined)
  target_link_libraries(train_softmax_asan PRIVATE m)
  add_test(NAME example_train_softmax_asan COMMAND train_softmax_asan ${_data}/controller_h16_l1.pt)
endif()
