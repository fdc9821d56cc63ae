// Temporary probe (removed before hand-back).
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::time::Instant;

fn settle() {
    std::process::Command::new("sync").status().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
}

fn raw(src: &std::path::Path, dst: &std::path::Path, inflight: usize) -> f64 {
    settle();
    let src = std::fs::File::open(src).unwrap();
    let total = src.metadata().unwrap().len();
    let d = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dst)
        .unwrap();
    let t = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let mut h = blake3::Hasher::new();
    let mut off = 0u64;
    let mut pending = std::collections::VecDeque::new();
    while off < total {
        let n = (total - off).min(1 << 20);
        let mut i = off as i64;
        let mut o = off as i64;
        let r = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut i,
                d.as_raw_fd(),
                &mut o,
                n as usize,
                0,
            )
        };
        assert_eq!(r as u64, n);
        d.read_exact_at(&mut buf[..n as usize], off).unwrap();
        h.update(&buf[..n as usize]);
        if inflight > 0 {
            unsafe {
                libc::sync_file_range(
                    d.as_raw_fd(),
                    off as i64,
                    n as i64,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
            pending.push_back((off, n));
            while pending.len() > inflight {
                let (o, l) = pending.pop_front().unwrap();
                unsafe {
                    libc::sync_file_range(
                        d.as_raw_fd(),
                        o as i64,
                        l as i64,
                        libc::SYNC_FILE_RANGE_WAIT_BEFORE
                            | libc::SYNC_FILE_RANGE_WRITE
                            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                    );
                }
            }
        }
        off += n;
    }
    d.sync_all().unwrap();
    let s = t.elapsed().as_secs_f64();
    std::fs::remove_file(dst).unwrap();
    s
}

fn main() {
    let dir = std::path::Path::new("/tmp/copyprobe");
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let src = dir.join("src");
    std::process::Command::new("dd")
        .args([
            "if=/dev/urandom",
            &format!("of={}", src.display()),
            "bs=1M",
            "count=1024",
            "status=none",
        ])
        .status()
        .unwrap();
    for round in 0..3 {
        settle();
        let t = Instant::now();
        std::process::Command::new("cp")
            .arg(&src)
            .arg(dir.join("cp"))
            .status()
            .unwrap();
        std::process::Command::new("sync").status().unwrap();
        print!("round {round}: cp+sync {:.2}", t.elapsed().as_secs_f64());
        std::fs::remove_file(dir.join("cp")).unwrap();
        for inflight in [0usize, 8, 32, 128, 100000] {
            print!(
                " | wb{inflight} {:.2}",
                raw(&src, &dir.join("raw"), inflight)
            );
        }
        println!();
    }
    std::fs::remove_dir_all(dir).unwrap();
}
