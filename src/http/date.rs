//! HTTP-date (RFC 9110 §5.6.7 IMF-fixdate) formatting without `fmt`.
//!
//! Every record read answers with `Last-Modified`; `httpdate::fmt_http_date` goes through
//! `core::fmt` and a `String` (~1300 instructions under callgrind), which was a tenth of the
//! app's work per cached-size GET. This writes the 29 bytes straight into a stack buffer.
//! Pure, and checked against `httpdate` by a property test.

use http::HeaderValue;

const DAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
const MONTHS: [&[u8; 3]; 12] = [
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
];

/// The IMF-fixdate for `secs` since the Unix epoch, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
/// Years past 9999 are clamped to the last second of 9999, as `httpdate` does not format them
/// either.
pub fn imf_fixdate(secs: u64) -> [u8; 29] {
    const MAX: u64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    let secs = secs.min(MAX);
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    let mut out = *b"Thu, 01 Jan 1970 00:00:00 GMT";
    out[..3].copy_from_slice(DAYS[(days % 7) as usize]);
    two(&mut out[5..7], day);
    out[8..11].copy_from_slice(MONTHS[(month - 1) as usize]);
    two(&mut out[12..14], year / 100);
    two(&mut out[14..16], year % 100);
    two(&mut out[17..19], (rem / 3600) as u32);
    two(&mut out[20..22], (rem / 60 % 60) as u32);
    two(&mut out[23..25], (rem % 60) as u32);
    out
}

/// [`imf_fixdate`] as a header value.
pub fn http_date_header(secs: u64) -> HeaderValue {
    let bytes = imf_fixdate(secs);
    // The bytes are ASCII letters, digits, spaces, commas and colons: always a valid value.
    HeaderValue::from_bytes(&bytes).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn two(dst: &mut [u8], n: u32) {
    dst[0] = b'0' + (n / 10 % 10) as u8;
    dst[1] = b'0' + (n % 10) as u8;
}

/// Howard Hinnant's days-to-civil algorithm: (year, month 1–12, day 1–31) of a day count
/// since 1970-01-01 in the proleptic Gregorian calendar.
fn civil_from_days(days: u64) -> (u32, u32, u32) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = (yoe + era * 400) as u32 + u32::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn known_dates() {
        assert_eq!(&imf_fixdate(0), b"Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(&imf_fixdate(784_111_777), b"Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(&imf_fixdate(951_782_400), b"Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(&imf_fixdate(u64::MAX), b"Fri, 31 Dec 9999 23:59:59 GMT");
    }

    proptest! {
        #[test]
        fn matches_httpdate(secs in 0u64..253_402_300_800) {
            let ours = imf_fixdate(secs);
            let theirs = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(secs));
            prop_assert_eq!(std::str::from_utf8(&ours).unwrap(), theirs);
        }
    }
}
