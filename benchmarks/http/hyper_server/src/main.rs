//! The hyper 0.14 peer of H1-H3 (BENCH.md): the routes of the seeds' scenario on a
//! current_thread Tokio runtime (one loop thread, like uvicorn and the anyio-cpp server).
//!
//!   GET /async       {"ok":true}, answered on the loop
//!   GET /sync?ms=N   sleeps N ms on a blocking thread: spawn_blocking behind a Semaphore of
//!                    --tokens permits (40, anyio's default limiter), then {"ok":true}
//!   GET /stats       {"borrowed_tokens","total_tokens","available_permits","tasks_waiting"}
//!
//!   hyper_server [--host 127.0.0.1] [--port 8000] [--tokens 40]
//!
//! --port 0 binds any free port. Once listening it prints `listening on http://HOST:PORT`.
//! Unknown paths answer 404, other methods than GET 405, a bad `ms` 400.
//! SIGTERM/SIGINT end it at once (the benchmark driver stops it only when no request is left).

use std::convert::Infallible;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::{make_service_fn, service_fn};
use hyper::{Body, Method, Request, Response, Server, StatusCode};
use tokio::sync::Semaphore;

const OK_BODY: &str = "{\"ok\":true}";

struct Limiter {
    semaphore: Semaphore,
    total: usize,
    /// Requests waiting for a permit (tokio's Semaphore does not count them).
    waiting: AtomicUsize,
}

/// Counts one waiter for as long as it lives, so a request dropped while it waits (its client
/// went away) is not counted for ever.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        // Relaxed: a statistic, only read by /stats on the same loop thread.
        counter.fetch_add(1, Ordering::Relaxed);
        Waiting(counter)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed); // Relaxed: see Waiting::new
    }
}

fn json(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn sleep_ms(query: Option<&str>) -> Option<u64> {
    let query = query.unwrap_or("");
    if query.is_empty() {
        return Some(0);
    }
    let mut ms = Some(0);
    for pair in query.split('&') {
        let mut kv = pair.splitn(2, '=');
        if kv.next() == Some("ms") {
            ms = kv.next().and_then(|v| v.parse::<u64>().ok());
        }
    }
    ms
}

async fn handle(limiter: Arc<Limiter>, request: Request<Body>) -> Result<Response<Body>, Infallible> {
    let path = request.uri().path();
    if !matches!(path, "/async" | "/sync" | "/stats") {
        return Ok(json(StatusCode::NOT_FOUND, "{\"detail\":\"Not Found\"}".to_string()));
    }
    if request.method() != Method::GET {
        return Ok(json(StatusCode::METHOD_NOT_ALLOWED, "{\"detail\":\"Method Not Allowed\"}".to_string()));
    }
    match path {
        "/async" => Ok(json(StatusCode::OK, OK_BODY.to_string())),
        "/sync" => {
            let ms = match sleep_ms(request.uri().query()) {
                Some(ms) => ms,
                None => return Ok(json(StatusCode::BAD_REQUEST, "{\"detail\":\"ms must be an integer\"}".to_string())),
            };
            let permit = {
                let _waiting = Waiting::new(&limiter.waiting);
                limiter.semaphore.acquire().await.expect("the semaphore is never closed")
            };
            tokio::task::spawn_blocking(move || std::thread::sleep(Duration::from_millis(ms)))
                .await
                .expect("the blocking sleep panicked");
            drop(permit);
            Ok(json(StatusCode::OK, OK_BODY.to_string()))
        }
        _ => {
            let available = limiter.semaphore.available_permits();
            Ok(json(
                StatusCode::OK,
                format!(
                    "{{\"borrowed_tokens\":{},\"total_tokens\":{},\"available_permits\":{},\"tasks_waiting\":{}}}",
                    limiter.total - available,
                    limiter.total,
                    available,
                    limiter.waiting.load(Ordering::Relaxed) // Relaxed: see Waiting::new
                ),
            ))
        }
    }
}

fn usage(why: &str) -> ! {
    eprintln!("{}\nusage: hyper_server [--host ADDR] [--port N] [--tokens N]", why);
    std::process::exit(2);
}

fn main() {
    let mut host: IpAddr = [127, 0, 0, 1].into();
    let mut port: u16 = 8000;
    let mut tokens: usize = 40;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().unwrap_or_else(|| usage(&format!("{} needs a value", name)));
        match arg.as_str() {
            "--host" => host = value("--host").parse().unwrap_or_else(|_| usage("--host needs an IP address")),
            "--port" => port = value("--port").parse().unwrap_or_else(|_| usage("--port needs a port number")),
            "--tokens" => {
                tokens = match value("--tokens").parse() {
                    Ok(n) if n > 0 => n,
                    _ => usage("--tokens needs a positive integer"),
                }
            }
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument: {}", other)),
        }
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot build the Tokio runtime");
    runtime.block_on(async move {
        let limiter = Arc::new(Limiter { semaphore: Semaphore::new(tokens), total: tokens, waiting: AtomicUsize::new(0) });
        let make_service = make_service_fn(move |_connection| {
            let limiter = limiter.clone();
            async move { Ok::<_, Infallible>(service_fn(move |request| handle(limiter.clone(), request))) }
        });
        let builder = Server::try_bind(&SocketAddr::new(host, port)).unwrap_or_else(|e| {
            eprintln!("hyper_server: cannot listen on {}:{}: {}", host, port, e);
            std::process::exit(1);
        });
        let server = builder.tcp_nodelay(true).serve(make_service);
        println!("listening on http://{}", server.local_addr());
        std::io::stdout().flush().ok();
        if let Err(e) = server.await {
            eprintln!("hyper_server: {}", e);
            std::process::exit(1);
        }
    });
}
