//! `ct-bench spawn THREADS DURATION PROGRAM`: the spawn ceiling. THREADS threads each
//! `posix_spawn` PROGRAM (no arguments, stdio inherited, `/dev/null` from bench/run.sh) and
//! `waitpid` it, back to back, until DURATION has passed; prints spawns per second. Nothing
//! else happens per spawn: no pipes, no process group, no socket, no script. It is the most
//! processes per second this machine's kernel and libc give, the limit of W2. With `--pin`
//! thread i is bound to the i-th CPU this process may use (in turn), and so are the processes
//! it starts: the ceiling of `command-trigger serve --pin-workers`, whose workers are bound so.

use std::ffi::CString;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

pub fn run(threads: usize, duration: Duration, program: &str, pin: bool) -> io::Result<()> {
    let path = CString::new(program).map_err(io::Error::other)?;
    let cpus = if pin { allowed_cpus()? } else { Vec::new() };
    let spawned = AtomicU64::new(0);
    let started = Instant::now();
    let deadline = started + duration;
    thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|i| {
                let cpu = (!cpus.is_empty()).then(|| cpus[i % cpus.len()]);
                let (path, spawned) = (&path, &spawned);
                scope.spawn(move || {
                    if let Some(cpu) = cpu {
                        bind_to(cpu)?;
                    }
                    spawn_until(path, deadline, spawned)
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .map_err(|_| io::Error::other("a thread panicked"))?
        })
    })?;
    let elapsed = started.elapsed().as_secs_f64();
    let n = spawned.load(Ordering::Relaxed);
    println!(
        "spawns_per_s={:.0} spawns={n} threads={threads} elapsed_s={elapsed:.3}",
        n as f64 / elapsed
    );
    Ok(())
}

/// The CPUs this process may run on, in order.
fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is an empty set; the call fills it, its size given.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let max = 8 * std::mem::size_of_val(&set);
    // SAFETY: every index is below the set's size in bits.
    Ok((0..max)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// Binds the calling thread (and so the processes it starts) to `cpu`.
fn bind_to(cpu: usize) -> io::Result<()> {
    // SAFETY: as in allowed_cpus; `cpu` is one of the set's.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn spawn_until(path: &CString, deadline: Instant, spawned: &AtomicU64) -> io::Result<()> {
    while Instant::now() < deadline {
        spawn_and_wait(path)?;
        // Counted only once it has been waited for, as a W2 request is answered only then.
        if Instant::now() < deadline {
            spawned.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Runs `path` (no arguments, our stdio and environment) to its end.
pub fn spawn_and_wait(path: &CString) -> io::Result<()> {
    let argv = [path.as_ptr() as *mut libc::c_char, std::ptr::null_mut()];
    let mut pid: libc::pid_t = 0;
    // SAFETY: path and argv are NUL-terminated and outlive the call; a null file-actions and
    // attribute pointer mean "none"; environ is the process's own environment.
    let rc = unsafe {
        libc::posix_spawn(
            &mut pid,
            path.as_ptr(),
            std::ptr::null(),
            std::ptr::null(),
            argv.as_ptr(),
            environ(),
        )
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    let mut status = 0;
    // SAFETY: pid is our child; status is a valid out pointer.
    if unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn environ() -> *const *mut libc::c_char {
    unsafe extern "C" {
        static environ: *const *mut libc::c_char;
    }
    // SAFETY: read once per spawn; nothing in this program changes the environment.
    unsafe { environ }
}
