# Compiles every C++ snippet of README.md, so a snippet that stops compiling breaks the build.
#
# The rule for whoever writes README.md: every fenced block opened with ```cpp is a complete
# translation unit. It has its own #include lines and compiles on its own with the project's
# warning flags (-Wall -Wextra -Wpedantic -Werror). A `main` is optional: each block is only
# compiled (an OBJECT library), never linked, so it may declare functions it does not define
# (`int count_lines(const std::string& path);`). A fragment that cannot stand alone does not
# belong in a ```cpp block: make it complete, or keep it in examples/ and show it from there.
# The closing fence is a line of ``` alone; ```cpp may be indented by up to three spaces, as
# in a list item. Blocks with another info string (```sh, ```cmake, ```text...) are ignored.
#
# How: at configure time each block is written to
#   <build>/readme_snippets/readme_snippet_<n>.cpp     (n = 1, 2, ... in README order)
# starting with a #line directive, so diagnostics point at README.md's own lines, and becomes
# the OBJECT library `readme_snippet_<n>`; the target `readme_snippets` builds them all. A
# file is rewritten only when its text changed (no needless rebuilds), and editing README.md
# re-runs the extraction (it is a CMAKE_CONFIGURE_DEPENDS of the directory).

function(anyio_add_readme_snippets readme)
    set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS "${readme}")
    file(READ "${readme}" text)
    set(out_dir "${CMAKE_CURRENT_BINARY_DIR}/readme_snippets")
    file(MAKE_DIRECTORY "${out_dir}")

    # Walk the file line by line. The text is never turned into a CMake list: C++ is full of
    # semicolons, which a list would split on.
    set(line_no 0)
    set(count 0)
    set(in_block FALSE)
    set(summary "")
    while(NOT text STREQUAL "")
        string(FIND "${text}" "\n" newline)
        if(newline EQUAL -1)
            set(line "${text}")
            set(text "")
        else()
            string(SUBSTRING "${text}" 0 ${newline} line)
            math(EXPR rest "${newline} + 1")
            string(SUBSTRING "${text}" ${rest} -1 text)
        endif()
        string(REGEX REPLACE "\r$" "" line "${line}")
        math(EXPR line_no "${line_no} + 1")
        if(NOT in_block)
            if(line MATCHES "^ ? ? ?```cpp([ \t].*)?$")
                set(in_block TRUE)
                math(EXPR count "${count} + 1")
                math(EXPR first_line "${line_no} + 1")
                set(body "#line ${first_line} \"${readme}\"\n")
            endif()
        elseif(line MATCHES "^ ? ? ?```[ \t]*$")
            set(in_block FALSE)
            _anyio_write_snippet("${out_dir}/readme_snippet_${count}.cpp" "${body}")
            _anyio_add_snippet_target(readme_snippet_${count}
                "${out_dir}/readme_snippet_${count}.cpp")
            string(APPEND summary " ${count}:line ${first_line}")
        else()
            string(APPEND body "${line}\n")
        endif()
    endwhile()
    if(in_block)
        math(EXPR opened "${first_line} - 1")
        message(FATAL_ERROR
            "${readme}:${opened}: this ```cpp block is never closed; end it with a line of ``` "
            "(every ```cpp block is compiled by the build, see cmake/ReadmeSnippets.cmake)")
    endif()

    # Snippets removed from README.md since the last configure leave no stale files behind.
    file(GLOB old_files "${out_dir}/readme_snippet_*.cpp")
    foreach(old IN LISTS old_files)
        if(old MATCHES "readme_snippet_([0-9]+)\\.cpp$")
            if(CMAKE_MATCH_1 GREATER count)
                file(REMOVE "${old}")
            endif()
        endif()
    endforeach()

    if(NOT TARGET readme_snippets)
        add_custom_target(readme_snippets)
    endif()
    if(count GREATER 0)
        foreach(n RANGE 1 ${count})
            add_dependencies(readme_snippets readme_snippet_${n})
        endforeach()
    endif()
    get_filename_component(readme_name "${readme}" NAME)
    message(STATUS "anyio: ${count} C++ snippets of ${readme_name} compiled (block:first line):"
        "${summary}")
endfunction()

# Writes `content` to `path` unless the file already holds exactly that.
function(_anyio_write_snippet path content)
    if(EXISTS "${path}")
        file(READ "${path}" old)
        if(old STREQUAL content)
            return()
        endif()
    endif()
    file(WRITE "${path}" "${content}")
endfunction()

function(_anyio_add_snippet_target name source)
    add_library(${name} OBJECT "${source}")
    target_link_libraries(${name} PRIVATE anyio::anyio)
    if(TARGET fmt::fmt)
        target_link_libraries(${name} PRIVATE fmt::fmt)  # a snippet may print with fmt
    endif()
    anyio_add_project_options(${name})
    if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
        # The #line directive names README.md, so g++ takes the snippet for a header and warns
        # (-Wsubobject-linkage) about lambdas kept in coroutine frames, as it never does in a
        # main file: examples/tour.cpp compiles the same code cleanly. Every other warning stays.
        target_compile_options(${name} PRIVATE -Wno-subobject-linkage)
    endif()
endfunction()
