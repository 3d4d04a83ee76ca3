//! `ct-bench spawn-server THREADS PORT PROGRAM`: the W2 limit with the network in it. THREADS
//! threads share one listener on 127.0.0.1:PORT; each accepts a connection, reads up to its
//! first newline, `posix_spawn`s PROGRAM and waits for it, answers `ok\n` and closes. No
//! token, no script, no output captured, no event loop: what the spawn ceiling costs plus one
//! TCP connection per request, and nothing else. A server that runs one process per request
//! and speaks TCP cannot be expected to beat it on the same machine and load. It ends its
//! reply as command-trigger does (reply and FIN in one segment), so it pays no packet more.

use std::ffi::CString;
use std::io::{self, Read};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::thread;

/// A request longer than this is not W2's; it is answered all the same.
const MAX_REQUEST: usize = 4096;

pub fn run(threads: usize, port: u16, program: &str) -> io::Result<()> {
    let path = CString::new(program).map_err(io::Error::other)?;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))?;
    thread::scope(|scope| {
        for _ in 0..threads {
            let (listener, path) = (&listener, &path);
            scope.spawn(move || serve(listener, path));
        }
    });
    Ok(())
}

/// Serves connections one at a time until the process is stopped; a failed one is dropped.
fn serve(listener: &TcpListener, path: &CString) {
    loop {
        if let Ok((stream, _)) = listener.accept()
            && let Err(e) = answer(stream, path)
        {
            eprintln!("ct-bench: spawn-server: {e}");
        }
    }
}

fn answer(mut stream: TcpStream, path: &CString) -> io::Result<()> {
    let mut request = [0u8; MAX_REQUEST];
    let mut len = 0;
    while len < request.len() && !request[..len].contains(&b'\n') {
        match stream.read(&mut request[len..])? {
            0 => break,
            n => len += n,
        }
    }
    crate::spawn::spawn_and_wait(path)?;
    send_before_fin(&stream, b"ok\n")?;
    stream.shutdown(Shutdown::Write)
}

/// `MSG_MORE`: the kernel holds the short reply back and the shutdown's FIN rides on it.
fn send_before_fin(stream: &TcpStream, reply: &[u8]) -> io::Result<()> {
    let flags = libc::MSG_MORE | libc::MSG_NOSIGNAL;
    // SAFETY: a connected socket, and a buffer valid for its length.
    let sent = unsafe {
        libc::send(
            stream.as_raw_fd(),
            reply.as_ptr().cast(),
            reply.len(),
            flags,
        )
    };
    match usize::try_from(sent) {
        Ok(n) if n == reply.len() => Ok(()),
        Ok(_) => Err(io::Error::other("short send")),
        Err(_) => Err(io::Error::last_os_error()),
    }
}
