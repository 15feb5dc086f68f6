# Targets of lspo. Sources are picked up by pattern so that each component owns its files:
#   src/*.cpp              core library (files ending _avx2.cpp / _avx512.cpp get ISA flags and are
#                          only ever entered after runtime CPU dispatch)
#   cuda/*.cu              CUDA kernels (torch-free: raw pointers, sizes, an explicit stream)
#   python/src/*.cpp       the pybind11 extension lspo._C
#   tests/cpp/*.cpp        one GoogleTest binary
#   benchmarks/cpp/*.cpp   one executable each (Google Benchmark or a plain main)

file(GLOB LSPO_CPP_SOURCES CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/src/*.cpp)
file(GLOB LSPO_CU_SOURCES CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/cuda/*.cu)

set(LSPO_AVX2_FLAGS -mavx2 -mfma -mf16c)
set(LSPO_AVX512_FLAGS -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx512bf16 -mfma -mf16c)
foreach(src ${LSPO_CPP_SOURCES})
  if(src MATCHES "_avx512\\.cpp$")
    set_source_files_properties(${src} PROPERTIES COMPILE_OPTIONS "${LSPO_AVX512_FLAGS}")
  elseif(src MATCHES "_avx2\\.cpp$")
    set_source_files_properties(${src} PROPERTIES COMPILE_OPTIONS "${LSPO_AVX2_FLAGS}")
  endif()
endforeach()
# Fused Adam (src/cpu_adam*.cpp): no FMA contraction, so that every ISA path performs exactly the
# fp32 operations of the scalar reference and the tests can demand bit-identical results.
foreach(src ${LSPO_CPP_SOURCES})
  if(src MATCHES "/cpu_adam[^/]*\\.cpp$")
    set_property(SOURCE ${src} APPEND PROPERTY COMPILE_OPTIONS -ffp-contract=off)
  endif()
endforeach()

set(_lspo_srcs ${LSPO_CPP_SOURCES})
if(LSPO_WITH_CUDA)
  list(APPEND _lspo_srcs ${LSPO_CU_SOURCES})
endif()

add_library(lspo_objs OBJECT ${_lspo_srcs})
target_include_directories(lspo_objs PUBLIC
  $<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}/include>
  $<INSTALL_INTERFACE:include>)
target_link_libraries(lspo_objs PUBLIC ${TORCH_LIBRARIES} Threads::Threads)
target_compile_options(lspo_objs PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wno-unused-parameter>)
if(LSPO_WITH_CUDA)
  target_compile_definitions(lspo_objs PUBLIC LSPO_WITH_CUDA=1)
  target_link_libraries(lspo_objs PUBLIC CUDA::cudart CUDA::cusparse CUDA::cublas)
  set_target_properties(lspo_objs PROPERTIES CUDA_SEPARABLE_COMPILATION OFF
                        CUDA_ARCHITECTURES "${LSPO_CUDA_ARCHITECTURES}")
  target_compile_options(lspo_objs PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -lineinfo>)
endif()
if(LSPO_WITH_DNNL)
  find_package(dnnl REQUIRED)
  target_compile_definitions(lspo_objs PUBLIC LSPO_WITH_DNNL=1)
  target_link_libraries(lspo_objs PUBLIC DNNL::dnnl)
endif()

# The C++ library users link (lspo::lspo).
add_library(lspo SHARED $<TARGET_OBJECTS:lspo_objs>)
add_library(lspo::lspo ALIAS lspo)
target_link_libraries(lspo PUBLIC lspo_objs)
set_target_properties(lspo PROPERTIES VERSION ${PROJECT_VERSION} SOVERSION ${PROJECT_VERSION_MAJOR})
# The installed library finds LibTorch (libc10_cuda, ...) and the CUDA libraries it links where they
# were at build time: their directories go into its install RPATH.
set_target_properties(lspo PROPERTIES INSTALL_RPATH "${TORCH_INSTALL_PREFIX}/lib" INSTALL_RPATH_USE_LINK_PATH TRUE)

# ---------------------------------------------------------------- python extension
if(LSPO_BUILD_PYTHON)
  # pybind11: the copy bundled with LibTorch (torch/include/pybind11), as torch's own extensions
  # do. A different pybind11 would not share torch's internals (type casters, exception
  # translators) and crashes at run time.
  file(GLOB LSPO_PY_SOURCES CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/python/src/*.cpp)
  Python3_add_library(_C MODULE WITH_SOABI ${LSPO_PY_SOURCES} $<TARGET_OBJECTS:lspo_objs>)
  set_target_properties(_C PROPERTIES CXX_VISIBILITY_PRESET hidden)
  find_library(TORCH_PYTHON_LIBRARY torch_python PATHS "${TORCH_INSTALL_PREFIX}/lib" REQUIRED)
  target_link_libraries(_C PRIVATE lspo_objs ${TORCH_PYTHON_LIBRARY})
  target_compile_definitions(_C PRIVATE TORCH_EXTENSION_NAME=_C)
  if(LSPO_INPLACE_EXT)
    add_custom_command(TARGET _C POST_BUILD
      COMMAND ${CMAKE_COMMAND} -E copy $<TARGET_FILE:_C> ${PROJECT_SOURCE_DIR}/python/lspo/)
  endif()
  if(SKBUILD)
    set_target_properties(_C PROPERTIES INSTALL_RPATH "${TORCH_INSTALL_PREFIX}/lib")
    install(TARGETS _C LIBRARY DESTINATION lspo)
    install(DIRECTORY ${PROJECT_SOURCE_DIR}/python/lspo/ DESTINATION lspo
            FILES_MATCHING PATTERN "*.py" PATTERN "__pycache__" EXCLUDE)
  endif()
endif()

# ---------------------------------------------------------------- tests and benchmarks
if(LSPO_BUILD_TESTS)
  enable_testing()
  find_package(GTest REQUIRED)
  file(GLOB LSPO_TEST_SOURCES CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/tests/cpp/*.cpp)
  add_executable(lspo_tests ${LSPO_TEST_SOURCES})
  target_link_libraries(lspo_tests PRIVATE lspo GTest::gtest GTest::gtest_main)
  # one CTest test per GoogleTest suite, listed when ctest runs (cmake/LspoCTestSuites.cmake says why)
  file(GENERATE OUTPUT ${CMAKE_CURRENT_BINARY_DIR}/lspo_tests_suites.cmake CONTENT
       "set(LSPO_TEST_EXE \"$<TARGET_FILE:lspo_tests>\")\nset(LSPO_TEST_DIR \"${CMAKE_CURRENT_BINARY_DIR}\")\ninclude(\"${PROJECT_SOURCE_DIR}/cmake/LspoCTestSuites.cmake\")\n")
  set_property(DIRECTORY APPEND PROPERTY TEST_INCLUDE_FILES ${CMAKE_CURRENT_BINARY_DIR}/lspo_tests_suites.cmake)
  # the C++ face driven by tests/python/test_faces.py (Python face == C++ face, bitwise)
  add_executable(lspo_crosscheck ${PROJECT_SOURCE_DIR}/tests/crosscheck/crosscheck.cpp)
  target_link_libraries(lspo_crosscheck PRIVATE lspo)
endif()

if(LSPO_BUILD_BENCHMARKS)
  file(GLOB LSPO_BENCH_SOURCES CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/benchmarks/cpp/*.cpp)
  foreach(src ${LSPO_BENCH_SOURCES})
    get_filename_component(name ${src} NAME_WE)
    add_executable(${name} ${src})
    target_link_libraries(${name} PRIVATE lspo)
  endforeach()
endif()

# ---------------------------------------------------------------- install / find_package(lspo)
if(NOT SKBUILD)
  include(GNUInstallDirs)
  include(CMakePackageConfigHelpers)
  install(TARGETS lspo lspo_objs EXPORT lspoTargets
          LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
          ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
          INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
  install(DIRECTORY include/lspo DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
  install(EXPORT lspoTargets NAMESPACE lspo:: DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/lspo)
  configure_package_config_file(cmake/lspoConfig.cmake.in ${CMAKE_BINARY_DIR}/lspoConfig.cmake
    INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/lspo)
  write_basic_package_version_file(${CMAKE_BINARY_DIR}/lspoConfigVersion.cmake
    COMPATIBILITY SameMinorVersion)
  install(FILES ${CMAKE_BINARY_DIR}/lspoConfig.cmake ${CMAKE_BINARY_DIR}/lspoConfigVersion.cmake
          DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/lspo)
endif()
