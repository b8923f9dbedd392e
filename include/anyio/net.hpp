// anyio-cpp: the network layer in one include (anyio's sockets): SocketStream, connect_tcp
// (Happy Eyeballs), create_tcp_listener / TcpListener, connect_unix / create_unix_listener /
// UnixListener, getaddrinfo on a worker thread. Each concept also has its own header.
#pragma once

#include "getaddrinfo.hpp"
#include "socket_address.hpp"
#include "socket_listener.hpp"
#include "socket_stream.hpp"
#include "tcp.hpp"
#include "unix_socket.hpp"
