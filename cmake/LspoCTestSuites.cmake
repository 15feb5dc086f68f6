# Included by ctest (the test directory's TEST_INCLUDE_FILES, see cmake/LspoSources.cmake) with
# LSPO_TEST_EXE set: lists the GoogleTest suites of that executable when ctest runs (as
# gtest_discover_tests' PRE_TEST mode does for single tests) and adds one CTest test per suite,
# `lspo_tests --gtest_filter=SUITE.*`. A suite's test fails when any of its GoogleTests fails; its
# output (--output-on-failure) names them. One process per suite, not per test: every process start
# initialises LibTorch (~0.6 s of static registration), which was most of ctest's time with 176 tests.
if(NOT EXISTS "${LSPO_TEST_EXE}")
  add_test(lspo_tests_NOT_BUILT "${LSPO_TEST_EXE}")  # fails: the executable is missing
  return()
endif()
execute_process(COMMAND "${LSPO_TEST_EXE}" --gtest_list_tests OUTPUT_VARIABLE _lspo_list
                RESULT_VARIABLE _lspo_rc TIMEOUT 60)
if(NOT _lspo_rc EQUAL 0)
  message(FATAL_ERROR "${LSPO_TEST_EXE} --gtest_list_tests failed (${_lspo_rc}):\n${_lspo_list}")
endif()
# suite lines start at column 0 ("Suite." or "Prefix/Suite."); test lines are indented
string(REGEX MATCHALL "(^|\n)[A-Za-z_][A-Za-z0-9_/]*\\." _lspo_suites "${_lspo_list}")
set(_lspo_n 0)
foreach(_lspo_suite IN LISTS _lspo_suites)
  string(STRIP "${_lspo_suite}" _lspo_suite)
  string(REGEX REPLACE "\\.$" "" _lspo_suite "${_lspo_suite}")
  add_test("${_lspo_suite}" "${LSPO_TEST_EXE}" "--gtest_filter=${_lspo_suite}.*")
  set_tests_properties("${_lspo_suite}" PROPERTIES WORKING_DIRECTORY "${LSPO_TEST_DIR}")
  math(EXPR _lspo_n "${_lspo_n} + 1")
endforeach()
if(_lspo_n EQUAL 0)
  message(FATAL_ERROR "${LSPO_TEST_EXE} lists no GoogleTest suite:\n${_lspo_list}")
endif()
