//! The Windows service: entry point and the virtio-serial port.
//!
//! The service control manager starts the binary with no arguments; `main`
//! calls [`run`], which hands the thread to the SCM dispatcher. The service
//! main reports itself running and serves the port until stopped. Started
//! from a console instead, [`run`] serves the port in the foreground.
//!
//! Only `std` and the few advapi32 functions declared below are used, so the
//! stub needs no Windows crates.

use std::ffi::c_void;
use std::fs::OpenOptions;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use crate::{serve, Dispatcher, WINDOWS_PORT_PATH};

/// The service name registered with the SCM.
pub const SERVICE_NAME: &str = "kvmmanager-agent";

/// Wait before reopening the port after it failed (`connection_retry_seconds`).
const RETRY: Duration = Duration::from_secs(5);

const SERVICE_WIN32_OWN_PROCESS: u32 = 0x10;
const SERVICE_STOPPED: u32 = 1;
const SERVICE_RUNNING: u32 = 4;
const SERVICE_ACCEPT_STOP: u32 = 0x1;
const SERVICE_ACCEPT_SHUTDOWN: u32 = 0x4;
const SERVICE_CONTROL_STOP: u32 = 1;
const SERVICE_CONTROL_INTERROGATE: u32 = 4;
const SERVICE_CONTROL_SHUTDOWN: u32 = 5;
const NO_ERROR: u32 = 0;
const ERROR_CALL_NOT_IMPLEMENTED: u32 = 120;
const ERROR_FAILED_SERVICE_CONTROLLER_CONNECT: i32 = 1063;

type ServiceMain = unsafe extern "system" fn(argc: u32, argv: *mut *mut u16);
type HandlerEx = unsafe extern "system" fn(
    control: u32,
    event_type: u32,
    event_data: *mut c_void,
    context: *mut c_void,
) -> u32;

#[repr(C)]
struct ServiceTableEntryW {
    service_name: *mut u16,
    service_proc: Option<ServiceMain>,
}

#[repr(C)]
struct ServiceStatus {
    service_type: u32,
    current_state: u32,
    controls_accepted: u32,
    win32_exit_code: u32,
    service_specific_exit_code: u32,
    check_point: u32,
    wait_hint: u32,
}

#[link(name = "advapi32")]
extern "system" {
    fn StartServiceCtrlDispatcherW(table: *const ServiceTableEntryW) -> i32;
    fn RegisterServiceCtrlHandlerExW(
        name: *const u16,
        handler: Option<HandlerEx>,
        context: *mut c_void,
    ) -> isize;
    fn SetServiceStatus(handle: isize, status: *const ServiceStatus) -> i32;
}

/// The status handle the SCM gave the service main (0 before).
static STATUS_HANDLE: AtomicIsize = AtomicIsize::new(0);

fn wide(s: &str) -> Vec<u16> {
    s.encode_utf16().chain(std::iter::once(0)).collect()
}

fn set_state(state: u32) {
    let handle = STATUS_HANDLE.load(Ordering::SeqCst);
    if handle == 0 {
        return;
    }
    let status = ServiceStatus {
        service_type: SERVICE_WIN32_OWN_PROCESS,
        current_state: state,
        controls_accepted: if state == SERVICE_RUNNING {
            SERVICE_ACCEPT_STOP | SERVICE_ACCEPT_SHUTDOWN
        } else {
            0
        },
        win32_exit_code: NO_ERROR,
        service_specific_exit_code: 0,
        check_point: 0,
        wait_hint: 0,
    };
    // SAFETY: `handle` came from RegisterServiceCtrlHandlerExW and `status`
    // is a valid SERVICE_STATUS that outlives the call.
    unsafe {
        SetServiceStatus(handle, &status);
    }
}

unsafe extern "system" fn control_handler(
    control: u32,
    _event_type: u32,
    _event_data: *mut c_void,
    _context: *mut c_void,
) -> u32 {
    match control {
        SERVICE_CONTROL_STOP | SERVICE_CONTROL_SHUTDOWN => {
            // Requests are answered synchronously, so none is half-done when
            // the port read is abandoned here.
            set_state(SERVICE_STOPPED);
            std::process::exit(0);
        }
        SERVICE_CONTROL_INTERROGATE => NO_ERROR,
        _ => ERROR_CALL_NOT_IMPLEMENTED,
    }
}

unsafe extern "system" fn service_main(_argc: u32, _argv: *mut *mut u16) {
    let name = wide(SERVICE_NAME);
    // SAFETY: `name` is a NUL-terminated UTF-16 string alive for the call,
    // and `control_handler` has the HandlerEx signature.
    let handle = unsafe {
        RegisterServiceCtrlHandlerExW(name.as_ptr(), Some(control_handler), std::ptr::null_mut())
    };
    STATUS_HANDLE.store(handle, Ordering::SeqCst);
    set_state(SERVICE_RUNNING);
    serve_port_forever();
}

/// Opens the port and serves it; reopens it after end of stream or errors.
pub fn serve_port_forever() -> ! {
    let dispatcher = Dispatcher::default();
    loop {
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .open(WINDOWS_PORT_PATH)
            .and_then(|port| Ok((port.try_clone()?, port)));
        match opened {
            Ok((reader, writer)) => {
                if let Err(e) = serve(&dispatcher, reader, writer) {
                    eprintln!("{SERVICE_NAME}: {WINDOWS_PORT_PATH}: {e}");
                }
            }
            Err(e) => eprintln!("{SERVICE_NAME}: cannot open {WINDOWS_PORT_PATH}: {e}"),
        }
        std::thread::sleep(RETRY);
    }
}

/// Runs as a service when started by the SCM, else in the foreground.
pub fn run() -> ! {
    let mut name = wide(SERVICE_NAME);
    let table = [
        ServiceTableEntryW {
            service_name: name.as_mut_ptr(),
            service_proc: Some(service_main),
        },
        ServiceTableEntryW {
            service_name: std::ptr::null_mut(),
            service_proc: None,
        },
    ];
    // SAFETY: `table` is a null-terminated SERVICE_TABLE_ENTRYW array whose
    // strings live until the dispatcher returns (it blocks for the service's
    // lifetime).
    let ok = unsafe { StartServiceCtrlDispatcherW(table.as_ptr()) };
    if ok == 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(ERROR_FAILED_SERVICE_CONTROLLER_CONNECT) {
            eprintln!("{SERVICE_NAME}: service dispatcher failed: {err}");
        }
        // Not started by the SCM: serve in the foreground.
        serve_port_forever();
    }
    std::process::exit(0);
}
