//! An in-memory FUSE file system that simulates power loss, in the spirit of
//! LazyFS.
//!
//! Every regular file keeps two copies of its bytes: `data`, what reads see,
//! and `synced`, what survives a power loss. `write`, truncation (`setattr`
//! with a size, `O_TRUNC`) and `fallocate` change `data` only; `fsync` and
//! `fdatasync` of a file copy `data` to `synced`, whichever descriptor they go
//! through. [`LazyFs::crash`] resets `data` to `synced` for every file under a
//! path, so each file holds exactly what its last fsync covered (a file never
//! synced becomes empty).
//!
//! Namespace operations (create, mknod, mkdir, unlink, rmdir, rename) take
//! effect and are durable at once, as in LazyFS: this models lost data, not
//! lost directory entries, so a crash never removes or resurrects a name and
//! `fsyncdir` has nothing to do (it is only counted). Attributes other than
//! the size (mode, owner, times) are not rolled back either.
//!
//! The kernel must not cache file data or attributes, or a crash would be
//! invisible: every open uses direct I/O (`FOPEN_DIRECT_IO`), entry and
//! attribute replies have a zero TTL, and the writeback cache is not
//! requested. `sync_file_range(2)` never reaches a FUSE file system, so it
//! makes nothing durable here.
//!
//! The session is served by a background thread of the test process. Dropping
//! [`LazyFs`] unmounts it.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    AccessFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, Session,
    SessionUnmounter, TimeOrNow, WriteFlags,
};

/// Nothing is cached by the kernel: a crash must be visible at once.
const TTL: Duration = Duration::ZERO;
/// `O_TRUNC` on Linux (the same value on every architecture we run on).
const O_TRUNC: i32 = 0o1000;
/// `O_EXCL` on Linux.
const O_EXCL: i32 = 0o200;
/// `FALLOC_FL_KEEP_SIZE`.
const FALLOC_FL_KEEP_SIZE: i32 = 1;
/// Longest file name accepted, as on most Linux file systems.
const NAME_MAX: usize = 255;
/// `S_IFMT` and `S_IFREG` for `mknod`.
const S_IFMT: u32 = 0o170_000;
const S_IFREG: u32 = 0o100_000;
/// First readdir cookie of a real entry: 1 and 2 are "." and "..".
const FIRST_COOKIE: u64 = 3;
/// How long `Drop` waits for the session thread after unmounting.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What `fsync`/`fdatasync` of a file does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `fsync` makes the file's current content durable.
    Honest,
    /// Control: `fsync` succeeds but does nothing, so a crash drops
    /// everything written since mount.
    #[allow(dead_code)]
    IgnoreFsync,
}

/// What a [`LazyFs::crash`] dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CrashReport {
    /// Files whose content differed from their last synced copy.
    pub files_reverted: u64,
    /// Bytes lost: for each file, the length difference plus the bytes of
    /// the common prefix that differ.
    pub bytes_dropped: u64,
}

/// Operation counts since mount.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// `fsync` and `fdatasync` calls on files (also counted in `IgnoreFsync`).
    pub fsyncs: u64,
    /// `fsync` calls on directories.
    pub fsyncdirs: u64,
    /// `write` requests.
    pub writes: u64,
    /// Bytes received by `write` requests.
    pub bytes_written: u64,
}

/// A mounted LazyFS. Dropping it unmounts the file system.
pub struct LazyFs {
    mountpoint: PathBuf,
    canonical: PathBuf,
    state: Arc<Mutex<State>>,
    unmounter: Option<SessionUnmounter>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl std::fmt::Debug for LazyFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyFs")
            .field("mountpoint", &self.mountpoint)
            .finish_non_exhaustive()
    }
}

#[allow(dead_code)]
impl LazyFs {
    /// Mounts a fresh, empty file system at `mountpoint` (an existing empty
    /// directory) and serves it from a background thread of this process.
    pub fn mount(mountpoint: &Path, mode: Mode) -> io::Result<LazyFs> {
        let context = |e: io::Error, what: &str| {
            io::Error::new(
                e.kind(),
                format!("lazyfs: {what} {}: {e}", mountpoint.display()),
            )
        };
        let canonical = mountpoint
            .canonicalize()
            .map_err(|e| context(e, "cannot resolve mountpoint"))?;
        if !Path::new("/dev/fuse").exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "lazyfs: /dev/fuse does not exist (FUSE is not available here)",
            ));
        }
        let state = Arc::new(Mutex::new(State::new()));
        let fs = LazyFsImpl {
            state: state.clone(),
            mode,
        };
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("lazyfs".to_string())];
        config.n_threads = Some(1);
        let mut session = Session::new(fs, &canonical, &config).map_err(|e| {
            context(
                e,
                "cannot mount (needs /dev/fuse, and root or the fusermount3 program) at",
            )
        })?;
        let unmounter = session.unmount_callable();
        let thread = std::thread::Builder::new()
            .name("lazyfs".to_string())
            .spawn(move || session.run())
            .map_err(|e| context(e, "cannot start the session thread for"))?;
        Ok(LazyFs {
            mountpoint: mountpoint.to_path_buf(),
            canonical,
            state,
            unmounter: Some(unmounter),
            thread: Some(thread),
        })
    }

    /// The mountpoint, as given to [`LazyFs::mount`].
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// Simulates a power loss for every file under `under` (an absolute path
    /// inside the mount; the mountpoint itself means the whole file system):
    /// each file's content becomes its content at its last fsync. A path that
    /// does not exist in the file system drops nothing.
    ///
    /// Callers must make sure no process has these files open.
    ///
    /// # Panics
    /// If `under` is not inside the mount.
    pub fn crash(&self, under: &Path) -> CrashReport {
        let rel = self
            .relative(under)
            .unwrap_or_else(|| panic!("lazyfs: {} is not inside the mount", under.display()));
        let mut state = self.lock();
        let Some(start) = state.resolve(&rel) else {
            return CrashReport::default();
        };
        let mut report = CrashReport::default();
        let now = SystemTime::now();
        let mut stack = vec![start];
        while let Some(ino) = stack.pop() {
            let Some(inode) = state.inodes.get_mut(&ino) else {
                continue;
            };
            match &mut inode.body {
                Body::Dir(dir) => stack.extend(dir.entries.values().map(|e| e.ino)),
                Body::File { data, synced } => {
                    if data != synced {
                        report.files_reverted += 1;
                        report.bytes_dropped += bytes_differing(data, synced);
                        data.clone_from(synced);
                        inode.meta.mtime = now;
                        inode.meta.ctime = now;
                    }
                }
            }
        }
        report
    }

    /// Operation counts since mount.
    pub fn stats(&self) -> Stats {
        self.lock().stats
    }

    /// Aborts the FUSE connection and detaches the mount (`umount -f -l`):
    /// pending and later I/O on it fails with `ENOTCONN`. For watchdogs that
    /// must unblock a hung test; `Drop` does this on its own when a clean
    /// unmount fails.
    pub fn abort(&self) {
        force_unmount(&self.canonical);
    }

    /// `under` relative to the mountpoint, if it is inside the mount.
    fn relative(&self, under: &Path) -> Option<PathBuf> {
        if let Ok(rel) = under.strip_prefix(&self.mountpoint) {
            return Some(rel.to_path_buf());
        }
        if let Ok(rel) = under.strip_prefix(&self.canonical) {
            return Some(rel.to_path_buf());
        }
        // A relative or unnormalised spelling: canonicalise what exists.
        let canonical = under.canonicalize().ok()?;
        canonical
            .strip_prefix(&self.canonical)
            .ok()
            .map(Path::to_path_buf)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        if let Some(mut unmounter) = self.unmounter.take() {
            if let Err(e) = unmounter.unmount() {
                eprintln!(
                    "lazyfs: unmount of {} failed ({e}); forcing it",
                    self.canonical.display()
                );
                force_unmount(&self.canonical);
            }
        }
        let Some(thread) = self.thread.take() else {
            return;
        };
        let deadline = Instant::now() + JOIN_TIMEOUT;
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if !thread.is_finished() {
            // Something still holds the connection (a file left open after a
            // lazy unmount): abort it so the session thread can end.
            force_unmount(&self.canonical);
            let deadline = Instant::now() + JOIN_TIMEOUT;
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if thread.is_finished() {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("lazyfs: session ended with an error: {e}"),
                Err(_) => eprintln!("lazyfs: session thread panicked"),
            }
        } else {
            eprintln!("lazyfs: session thread did not end; leaving it behind");
        }
    }
}

/// `umount -f -l`: a forced unmount aborts the FUSE connection, and the lazy
/// one detaches the mount even while files are open.
fn force_unmount(path: &Path) {
    match Command::new("umount")
        .arg("-f")
        .arg("-l")
        .arg(path)
        .output()
    {
        Ok(out) if out.status.success() => {}
        Ok(out) => eprintln!(
            "lazyfs: umount -f -l {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => eprintln!("lazyfs: cannot run umount: {e}"),
    }
}

/// Whether an entry may go (unlink, rmdir, or replaced by a rename): a
/// directory only for a directory operation, and only when empty.
fn removable(body: &Body, as_dir: bool) -> Res<()> {
    match (body, as_dir) {
        (Body::Dir(_), false) => Err(Errno::EISDIR),
        (Body::File { .. }, true) => Err(Errno::ENOTDIR),
        (Body::Dir(dir), true) if !dir.entries.is_empty() => Err(Errno::ENOTEMPTY),
        _ => Ok(()),
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Length difference plus differing bytes of the common prefix.
fn bytes_differing(a: &[u8], b: &[u8]) -> u64 {
    let common = a.len().min(b.len());
    let differing = a[..common]
        .iter()
        .zip(&b[..common])
        .filter(|(x, y)| x != y)
        .count();
    (a.len().abs_diff(b.len()) + differing) as u64
}

/// The whole file system.
struct State {
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    next_fh: u64,
    stats: Stats,
}

struct Inode {
    meta: Meta,
    /// Names referring to this inode (0 once unlinked).
    nlink: u32,
    /// Open file handles; an unlinked inode lives until the last is released.
    open: u32,
    body: Body,
}

struct Meta {
    perm: u16,
    uid: u32,
    gid: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
    crtime: SystemTime,
}

enum Body {
    File { data: Vec<u8>, synced: Vec<u8> },
    Dir(Dir),
}

struct Dir {
    parent: u64,
    entries: BTreeMap<OsString, DirEntry>,
    /// Entries by readdir cookie. Cookies never change or get reused, so a
    /// listing resumes at the right place even while entries are removed.
    by_cookie: BTreeMap<u64, OsString>,
    next_cookie: u64,
}

struct DirEntry {
    ino: u64,
    cookie: u64,
}

impl Dir {
    fn new(parent: u64) -> Dir {
        Dir {
            parent,
            entries: BTreeMap::new(),
            by_cookie: BTreeMap::new(),
            next_cookie: FIRST_COOKIE,
        }
    }

    fn insert(&mut self, name: &OsStr, ino: u64) {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        if let Some(old) = self
            .entries
            .insert(name.to_owned(), DirEntry { ino, cookie })
        {
            self.by_cookie.remove(&old.cookie);
        }
        self.by_cookie.insert(cookie, name.to_owned());
    }

    fn remove(&mut self, name: &OsStr) -> Option<u64> {
        let entry = self.entries.remove(name)?;
        self.by_cookie.remove(&entry.cookie);
        Some(entry.ino)
    }
}

impl Meta {
    fn new(perm: u32, uid: u32, gid: u32) -> Meta {
        let now = SystemTime::now();
        Meta {
            perm: (perm & 0o7777) as u16,
            uid,
            gid,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
        }
    }
}

type Res<T> = Result<T, Errno>;

impl State {
    fn new() -> State {
        let mut inodes = HashMap::new();
        let root = INodeNo::ROOT.0;
        inodes.insert(
            root,
            Inode {
                meta: Meta::new(0o755, 0, 0),
                nlink: 2,
                open: 0,
                body: Body::Dir(Dir::new(root)),
            },
        );
        State {
            inodes,
            next_ino: root + 1,
            next_fh: 1,
            stats: Stats::default(),
        }
    }

    fn inode(&self, ino: u64) -> Res<&Inode> {
        self.inodes.get(&ino).ok_or(Errno::ENOENT)
    }

    fn inode_mut(&mut self, ino: u64) -> Res<&mut Inode> {
        self.inodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    fn dir(&self, ino: u64) -> Res<&Dir> {
        match &self.inode(ino)?.body {
            Body::Dir(dir) => Ok(dir),
            Body::File { .. } => Err(Errno::ENOTDIR),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> Res<&mut Dir> {
        match &mut self.inode_mut(ino)?.body {
            Body::Dir(dir) => Ok(dir),
            Body::File { .. } => Err(Errno::ENOTDIR),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Res<(&mut Vec<u8>, &mut Meta)> {
        let inode = self.inode_mut(ino)?;
        match &mut inode.body {
            Body::File { data, .. } => Ok((data, &mut inode.meta)),
            Body::Dir(_) => Err(Errno::EISDIR),
        }
    }

    fn child(&self, parent: u64, name: &OsStr) -> Res<u64> {
        self.dir(parent)?
            .entries
            .get(name)
            .map(|e| e.ino)
            .ok_or(Errno::ENOENT)
    }

    /// The inode at `rel`, a path relative to the root.
    fn resolve(&self, rel: &Path) -> Option<u64> {
        let mut ino = INodeNo::ROOT.0;
        for component in rel.components() {
            match component {
                Component::Normal(name) => ino = self.child(ino, name).ok()?,
                Component::CurDir | Component::RootDir => {}
                Component::ParentDir => ino = self.dir(ino).ok()?.parent,
                Component::Prefix(_) => return None,
            }
        }
        Some(ino)
    }

    fn kind(&self, ino: u64) -> FileType {
        match self.inodes.get(&ino).map(|i| &i.body) {
            Some(Body::Dir(_)) => FileType::Directory,
            _ => FileType::RegularFile,
        }
    }

    fn attr(&self, ino: u64) -> Res<FileAttr> {
        let inode = self.inode(ino)?;
        let (kind, size, nlink) = match &inode.body {
            Body::File { data, .. } => (FileType::RegularFile, data.len() as u64, inode.nlink),
            Body::Dir(dir) => {
                let subdirs = dir
                    .entries
                    .values()
                    .filter(|e| self.kind(e.ino) == FileType::Directory)
                    .count();
                (FileType::Directory, 4096, 2 + subdirs as u32)
            }
        };
        let m = &inode.meta;
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: m.atime,
            mtime: m.mtime,
            ctime: m.ctime,
            crtime: m.crtime,
            kind,
            perm: m.perm,
            nlink,
            uid: m.uid,
            gid: m.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    /// Adds a new inode named `name` in `parent`.
    fn make(&mut self, parent: u64, name: &OsStr, meta: Meta, dir: bool) -> Res<u64> {
        if name.len() > NAME_MAX {
            return Err(Errno::ENAMETOOLONG);
        }
        if self.dir(parent)?.entries.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let (body, nlink) = if dir {
            (Body::Dir(Dir::new(parent)), 2)
        } else {
            (
                Body::File {
                    data: Vec::new(),
                    synced: Vec::new(),
                },
                1,
            )
        };
        self.inodes.insert(
            ino,
            Inode {
                meta,
                nlink,
                open: 0,
                body,
            },
        );
        self.dir_mut(parent)?.insert(name, ino);
        self.touch_dir(parent);
        Ok(ino)
    }

    fn touch_dir(&mut self, ino: u64) {
        if let Some(inode) = self.inodes.get_mut(&ino) {
            let now = SystemTime::now();
            inode.meta.mtime = now;
            inode.meta.ctime = now;
        }
    }

    /// Drops one name of `ino`; frees it when nothing refers to it any more.
    fn unref(&mut self, ino: u64) {
        if let Some(inode) = self.inodes.get_mut(&ino) {
            inode.nlink = match inode.body {
                Body::Dir(_) => 0,
                Body::File { .. } => inode.nlink.saturating_sub(1),
            };
            inode.meta.ctime = SystemTime::now();
            if inode.nlink == 0 && inode.open == 0 {
                self.inodes.remove(&ino);
            }
        }
    }

    fn open_handle(&mut self, ino: u64) -> Res<FileHandle> {
        self.inode_mut(ino)?.open += 1;
        let fh = self.next_fh;
        self.next_fh += 1;
        Ok(FileHandle(fh))
    }

    fn release_handle(&mut self, ino: u64) {
        if let Some(inode) = self.inodes.get_mut(&ino) {
            inode.open = inode.open.saturating_sub(1);
            if inode.nlink == 0 && inode.open == 0 {
                self.inodes.remove(&ino);
            }
        }
    }

    fn truncate(&mut self, ino: u64, size: u64) -> Res<()> {
        let size = usize::try_from(size).map_err(|_| Errno::EFBIG)?;
        let (data, meta) = self.file_mut(ino)?;
        data.resize(size, 0);
        let now = SystemTime::now();
        meta.mtime = now;
        meta.ctime = now;
        Ok(())
    }

    fn remove(&mut self, parent: u64, name: &OsStr, want_dir: bool) -> Res<()> {
        let ino = self.child(parent, name)?;
        removable(&self.inode(ino)?.body, want_dir)?;
        self.dir_mut(parent)?.remove(name);
        self.touch_dir(parent);
        self.unref(ino);
        Ok(())
    }

    fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> Res<()> {
        if !(flags - RenameFlags::RENAME_NOREPLACE).is_empty() {
            // RENAME_EXCHANGE and RENAME_WHITEOUT are not supported.
            return Err(Errno::EINVAL);
        }
        if newname.len() > NAME_MAX {
            return Err(Errno::ENAMETOOLONG);
        }
        let ino = self.child(parent, name)?;
        self.dir(newparent)?;
        let src_is_dir = self.kind(ino) == FileType::Directory;
        if src_is_dir && self.is_ancestor(ino, newparent) {
            return Err(Errno::EINVAL);
        }
        if let Ok(target) = self.child(newparent, newname) {
            if target == ino {
                return Ok(());
            }
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST);
            }
            removable(&self.inode(target)?.body, src_is_dir)?;
            self.dir_mut(newparent)?.remove(newname);
            self.unref(target);
        }
        self.dir_mut(parent)?.remove(name);
        self.dir_mut(newparent)?.insert(newname, ino);
        if let Body::Dir(dir) = &mut self.inode_mut(ino)?.body {
            dir.parent = newparent;
        }
        self.inode_mut(ino)?.meta.ctime = SystemTime::now();
        self.touch_dir(parent);
        self.touch_dir(newparent);
        Ok(())
    }

    /// Whether `dir` is `ino` or lies below it.
    fn is_ancestor(&self, ino: u64, mut dir: u64) -> bool {
        loop {
            if dir == ino {
                return true;
            }
            match self.dir(dir) {
                Ok(d) if d.parent != dir => dir = d.parent,
                _ => return false,
            }
        }
    }
}

/// The FUSE side: every request locks the shared state once.
struct LazyFsImpl {
    state: Arc<Mutex<State>>,
    mode: Mode,
}

impl LazyFsImpl {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

fn reply_empty(reply: ReplyEmpty, res: Res<()>) {
    match res {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn reply_entry(reply: ReplyEntry, res: Res<FileAttr>) {
    match res {
        Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn reply_attr(reply: ReplyAttr, res: Res<FileAttr>) {
    match res {
        Ok(attr) => reply.attr(&TTL, &attr),
        Err(e) => reply.error(e),
    }
}

fn reply_open(reply: ReplyOpen, res: Res<FileHandle>, flags: FopenFlags) {
    match res {
        Ok(fh) => reply.opened(fh, flags),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for LazyFsImpl {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let state = self.lock();
        reply_entry(
            reply,
            state.child(parent.0, name).and_then(|i| state.attr(i)),
        );
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply_attr(reply, self.lock().attr(ino.0));
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut state = self.lock();
        let res = (|| {
            let ino = ino.0;
            if let Some(size) = size {
                state.truncate(ino, size)?;
            }
            let meta = &mut state.inode_mut(ino)?.meta;
            if let Some(mode) = mode {
                meta.perm = (mode & 0o7777) as u16;
            }
            if let Some(uid) = uid {
                meta.uid = uid;
            }
            if let Some(gid) = gid {
                meta.gid = gid;
            }
            if let Some(t) = atime {
                meta.atime = time(t);
            }
            if let Some(t) = mtime {
                meta.mtime = time(t);
            }
            meta.ctime = ctime.unwrap_or_else(SystemTime::now);
            state.attr(ino)
        })();
        reply_attr(reply, res);
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & S_IFMT != S_IFREG && mode & S_IFMT != 0 {
            // Only regular files.
            reply.error(Errno::EPERM);
            return;
        }
        let mut state = self.lock();
        let meta = Meta::new(mode & !umask, req.uid(), req.gid());
        let res = state
            .make(parent.0, name, meta, false)
            .and_then(|i| state.attr(i));
        reply_entry(reply, res);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut state = self.lock();
        let meta = Meta::new(mode & !umask, req.uid(), req.gid());
        let res = state
            .make(parent.0, name, meta, true)
            .and_then(|i| state.attr(i));
        reply_entry(reply, res);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.lock().remove(parent.0, name, false));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.lock().remove(parent.0, name, true));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let res = self
            .lock()
            .rename(parent.0, name, newparent.0, newname, flags);
        reply_empty(reply, res);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut state = self.lock();
        let res = (|| {
            let is_file = matches!(state.inode(ino.0)?.body, Body::File { .. });
            if is_file && flags.0 & O_TRUNC != 0 {
                state.truncate(ino.0, 0)?;
            }
            state.open_handle(ino.0)
        })();
        reply_open(reply, res, FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let state = self.lock();
        match state.inode(ino.0).map(|i| &i.body) {
            Ok(Body::File { data, .. }) => {
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                let end = start.saturating_add(size as usize).min(data.len());
                reply.data(&data[start..end]);
            }
            Ok(Body::Dir(_)) => reply.error(Errno::EISDIR),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        bytes: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut state = self.lock();
        let res = (|| {
            let start = usize::try_from(offset).map_err(|_| Errno::EFBIG)?;
            let end = start.checked_add(bytes.len()).ok_or(Errno::EFBIG)?;
            let (data, meta) = state.file_mut(ino.0)?;
            if data.len() < end {
                data.resize(end, 0);
            }
            data[start..end].copy_from_slice(bytes);
            let now = SystemTime::now();
            meta.mtime = now;
            meta.ctime = now;
            state.stats.writes += 1;
            state.stats.bytes_written += bytes.len() as u64;
            Ok(bytes.len() as u32)
        })();
        match res {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) does not make anything durable.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.lock().release_handle(ino.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut state = self.lock();
        state.stats.fsyncs += 1;
        let honest = self.mode == Mode::Honest;
        let res = match state.inode_mut(ino.0).map(|i| &mut i.body) {
            Ok(Body::File { data, synced }) => {
                if honest {
                    synced.clone_from(data);
                }
                Ok(())
            }
            // Namespace changes are durable already.
            Ok(Body::Dir(_)) => Ok(()),
            Err(e) => Err(e),
        };
        // Never ENOSYS: the kernel would stop sending fsyncs and report
        // success for all later ones.
        reply_empty(reply, res);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut state = self.lock();
        let res = state
            .dir(ino.0)
            .map(|_| ())
            .and_then(|()| state.open_handle(ino.0));
        reply_open(reply, res, FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let state = self.lock();
        let dir = match state.dir(ino.0) {
            Ok(dir) => dir,
            Err(e) => {
                reply.error(e);
                return;
            }
        };
        // Cookies: 1 is ".", 2 is "..", then each entry's own cookie. The
        // offset the kernel sends back is the cookie of the last entry seen.
        if offset < 1 && reply.add(ino, 1, FileType::Directory, ".") {
            reply.ok();
            return;
        }
        if offset < 2 && reply.add(INodeNo(dir.parent), 2, FileType::Directory, "..") {
            reply.ok();
            return;
        }
        for (&cookie, name) in dir.by_cookie.range(offset.max(2) + 1..) {
            let child = dir.entries[name].ino;
            if reply.add(INodeNo(child), cookie, state.kind(child), name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.lock().release_handle(ino.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.lock().stats.fsyncdirs += 1;
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let state = self.lock();
        let used: u64 = state
            .inodes
            .values()
            .map(|i| match &i.body {
                Body::File { data, .. } => (data.len() as u64).div_ceil(4096),
                Body::Dir(_) => 1,
            })
            .sum();
        let blocks = 1 << 28; // 1 TiB of 4 KiB blocks.
        let files = 1 << 24;
        let free = blocks - used.min(blocks);
        let ffree = files - (state.inodes.len() as u64).min(files);
        reply.statfs(
            blocks,
            free,
            free,
            files,
            ffree,
            4096,
            NAME_MAX as u32,
            4096,
        );
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // The tests run as root: existence is all that is checked.
        reply_empty(reply, self.lock().inode(ino.0).map(|_| ()));
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut state = self.lock();
        let res = (|| {
            let ino = match state.child(parent.0, name) {
                // The kernel looks the name up first, so this is a race.
                Ok(_) if flags & O_EXCL != 0 => return Err(Errno::EEXIST),
                Ok(ino) => {
                    if flags & O_TRUNC != 0 {
                        state.truncate(ino, 0)?;
                    }
                    ino
                }
                Err(_) => {
                    let meta = Meta::new(mode & !umask, req.uid(), req.gid());
                    state.make(parent.0, name, meta, false)?
                }
            };
            let attr = state.attr(ino)?;
            let fh = state.open_handle(ino)?;
            Ok((attr, fh))
        })();
        match res {
            Ok((attr, fh)) => {
                reply.created(&TTL, &attr, Generation(0), fh, FopenFlags::FOPEN_DIRECT_IO)
            }
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let mut state = self.lock();
        let res = (|| {
            let len = state.file_mut(ino.0)?.0.len() as u64;
            match mode {
                0 => {
                    let end = offset.checked_add(length).ok_or(Errno::EFBIG)?;
                    if end > len {
                        state.truncate(ino.0, end)?;
                    }
                    Ok(())
                }
                FALLOC_FL_KEEP_SIZE => Ok(()),
                _ => Err(Errno::EOPNOTSUPP),
            }
        })();
        reply_empty(reply, res);
    }
}
