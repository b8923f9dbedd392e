# Builds and runs the consumer project in tests/consumer/ against anyio.
# Run by ctest as `cmake -D... -P run_consumer.cmake` (see tests/CMakeLists.txt).
#
#   MODE                install: `cmake --install ANYIO_BINARY_DIR` into a fresh prefix, then
#                       find_package(anyio) through CMAKE_PREFIX_PATH;
#                       subdirectory: add_subdirectory(ANYIO_SOURCE_DIR)
#   ANYIO_SOURCE_DIR    the anyio source tree
#   ANYIO_BINARY_DIR    the anyio build tree (install mode)
#   CONSUMER_SOURCE_DIR tests/consumer
#   WORK_DIR            scratch directory, wiped first
#   CXX_COMPILER, CXX_FLAGS, GENERATOR, MAKE_PROGRAM, BUILD_TYPE: passed through from the
#                       anyio build so the consumer is built the same way
cmake_minimum_required(VERSION 3.22)

foreach(var IN ITEMS MODE ANYIO_SOURCE_DIR CONSUMER_SOURCE_DIR WORK_DIR CXX_COMPILER GENERATOR)
    if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
        message(FATAL_ERROR "run_consumer.cmake: -D${var}=... is required")
    endif()
endforeach()
if(NOT BUILD_TYPE)
    set(BUILD_TYPE Release)
endif()

function(run_step description)
    message(STATUS "consumer (${MODE}): ${description}")
    execute_process(COMMAND ${ARGN} RESULT_VARIABLE result COMMAND_ECHO STDOUT)
    if(NOT result EQUAL 0)
        message(FATAL_ERROR "consumer (${MODE}): ${description} failed (${result})")
    endif()
endfunction()

file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")
set(build_dir "${WORK_DIR}/build")

set(configure_args
    -S "${CONSUMER_SOURCE_DIR}" -B "${build_dir}"
    -G "${GENERATOR}"
    "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}"
    "-DCMAKE_CXX_FLAGS=${CXX_FLAGS}"
    "-DCMAKE_BUILD_TYPE=${BUILD_TYPE}"
    # Never pick up an anyio registered or installed elsewhere on this machine.
    -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
if(MAKE_PROGRAM)
    list(APPEND configure_args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()

if(MODE STREQUAL "install")
    if(NOT ANYIO_BINARY_DIR)
        message(FATAL_ERROR "run_consumer.cmake: -DANYIO_BINARY_DIR=... is required")
    endif()
    set(prefix "${WORK_DIR}/prefix")
    run_step("install anyio into ${prefix}"
        "${CMAKE_COMMAND}" --install "${ANYIO_BINARY_DIR}" --prefix "${prefix}"
        --config "${BUILD_TYPE}")
    if(NOT EXISTS "${prefix}/include/anyio/anyio.hpp")
        message(FATAL_ERROR "consumer (install): ${prefix}/include/anyio/anyio.hpp not installed")
    endif()
    list(APPEND configure_args "-DCMAKE_PREFIX_PATH=${prefix}")
elseif(MODE STREQUAL "subdirectory")
    list(APPEND configure_args "-DANYIO_SOURCE_DIR=${ANYIO_SOURCE_DIR}")
else()
    message(FATAL_ERROR "run_consumer.cmake: MODE must be 'install' or 'subdirectory', not '${MODE}'")
endif()

run_step("configure" "${CMAKE_COMMAND}" ${configure_args})

if(MODE STREQUAL "install")
    # Make sure the package really came from our fresh prefix.
    file(STRINGS "${build_dir}/CMakeCache.txt" anyio_dir_line REGEX "^anyio_DIR:")
    string(REGEX REPLACE "^anyio_DIR:[A-Z]+=" "" anyio_dir "${anyio_dir_line}")
    file(REAL_PATH "${prefix}" real_prefix)
    file(REAL_PATH "${anyio_dir}" real_anyio_dir)
    string(FIND "${real_anyio_dir}" "${real_prefix}/" position)
    if(NOT position EQUAL 0)
        message(FATAL_ERROR
            "consumer (install): anyio was found at '${anyio_dir}', not under '${prefix}'")
    endif()
    if(EXISTS "${build_dir}/anyio-build")
        message(FATAL_ERROR "consumer (install): the source tree was used instead of the package")
    endif()
endif()

run_step("build" "${CMAKE_COMMAND}" --build "${build_dir}" --config "${BUILD_TYPE}")

find_program(consumer_exe anyio_consumer PATHS "${build_dir}" "${build_dir}/${BUILD_TYPE}"
    NO_DEFAULT_PATH NO_CACHE)
if(NOT consumer_exe)
    message(FATAL_ERROR "consumer (${MODE}): anyio_consumer was not built in ${build_dir}")
endif()
run_step("run" "${consumer_exe}")
message(STATUS "consumer (${MODE}): OK")
