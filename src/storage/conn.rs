//! The I/O edge of the storage protocol: reading whole frames from a socket (with a deadline
//! for a frame once it has started), writing frames, and both halves of the handshake.
//!
//! Server and client share this; neither handles bytes itself, and [`protocol`] stays pure.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::protocol::{self, Message, ProtocolError, Purpose, NONCE_LEN};

/// A byte stream the protocol runs over: plain TCP or TLS.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// A boxed [`Stream`], so plain and TLS connections share one code path.
pub type BoxStream = Box<dyn Stream>;

/// Why a connection ended or could not be set up. The text is what the logs show.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The peer sent bytes that are not valid protocol.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection between frames.
    #[error("connection closed by the peer")]
    Closed,
    /// The peer closed the connection with part of a frame sent.
    #[error("connection closed in the middle of a frame ({0} bytes of it received)")]
    Truncated(usize),
    /// A frame started but did not arrive whole in time.
    #[error("peer stalled mid-frame for more than {0:?}")]
    Stalled(Duration),
    /// A step with a deadline did not finish in time.
    #[error("timed out during {0}")]
    Timeout(&'static str),
    /// The server refused the handshake and said why.
    #[error("refused by the storage server: {0}")]
    Refused(String),
    /// The TLS handshake failed.
    #[error("TLS handshake failed: {0}")]
    Tls(String),
}

/// Reads whole frames from one side of a connection.
pub struct FrameReader<R> {
    rd: R,
    buf: BytesMut,
    max_frame: usize,
    frame_timeout: Duration,
    /// When the partial frame now in `buf` started arriving.
    partial_since: Option<Instant>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader taking frames of at most `max_frame` bytes; once a frame has started, the
    /// rest must arrive within `frame_timeout`.
    pub fn new(rd: R, max_frame: usize, frame_timeout: Duration) -> Self {
        Self::with_buf(
            rd,
            BytesMut::with_capacity(8 << 10),
            max_frame,
            frame_timeout,
        )
    }

    /// Like [`FrameReader::new`], starting with bytes already read (after a split).
    pub fn with_buf(rd: R, buf: BytesMut, max_frame: usize, frame_timeout: Duration) -> Self {
        let partial_since = (!buf.is_empty()).then(Instant::now);
        FrameReader {
            rd,
            buf,
            max_frame,
            frame_timeout,
            partial_since,
        }
    }

    /// The next message; `Ok(None)` when the peer closed cleanly between frames. Waits
    /// without limit for a frame to start (the caller races it against shutdown), but a
    /// started frame must be whole within the frame timeout. Cancel-safe.
    pub async fn read(&mut self) -> Result<Option<Message>, ConnError> {
        loop {
            if let Some(msg) = protocol::decode_frame(&mut self.buf, self.max_frame)? {
                self.partial_since = (!self.buf.is_empty()).then(Instant::now);
                return Ok(Some(msg));
            }
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(8 << 10);
            }
            let n = if self.buf.is_empty() {
                self.partial_since = None;
                self.rd.read_buf(&mut self.buf).await?
            } else {
                let since = *self.partial_since.get_or_insert_with(Instant::now);
                let deadline = since + self.frame_timeout;
                match tokio::time::timeout_at(deadline, self.rd.read_buf(&mut self.buf)).await {
                    Ok(read) => read?,
                    Err(_) => return Err(ConnError::Stalled(self.frame_timeout)),
                }
            };
            if n == 0 {
                return match self.buf.len() {
                    0 => Ok(None),
                    partial => Err(ConnError::Truncated(partial)),
                };
            }
        }
    }

    /// The next message if a whole one is already buffered, without touching the socket:
    /// lets a replica gather every entry that has arrived into one apply.
    pub fn buffered(&mut self) -> Result<Option<Message>, ConnError> {
        let msg = protocol::decode_frame(&mut self.buf, self.max_frame)?;
        if msg.is_some() {
            self.partial_since = (!self.buf.is_empty()).then(Instant::now);
        }
        Ok(msg)
    }

    /// The next message, treating a clean close as an error (inside a handshake).
    pub async fn expect(&mut self) -> Result<Message, ConnError> {
        self.read().await?.ok_or(ConnError::Closed)
    }

    /// The underlying reader, for writes during the handshake.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.rd
    }

    /// The reader and any bytes read past the last frame.
    pub fn into_parts(self) -> (R, BytesMut) {
        (self.rd, self.buf)
    }
}

/// Encodes and writes one message, flushing it.
pub async fn write_message<W: AsyncWrite + Unpin>(w: &mut W, msg: &Message) -> std::io::Result<()> {
    w.write_all(&protocol::encode_frame(msg)).await?;
    w.flush().await
}

/// What the server learnt from a successful handshake.
#[derive(Debug)]
pub struct Accepted {
    /// What the client opened the connection for.
    pub purpose: Purpose,
}

/// The server's half of the handshake: Hello → Challenge → Auth. On success the caller
/// answers Welcome (or Refused, if it does not serve the purpose). A peer that speaks
/// another version or fails the proof is told so with Refused; a peer that is not a Strata
/// node at all gets nothing back.
pub async fn server_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    fr: &mut FrameReader<S>,
    secret: &[u8],
) -> Result<Accepted, ConnError> {
    let Message::Hello {
        magic,
        version,
        client_nonce,
        purpose,
    } = fr.expect().await?
    else {
        return Err(ProtocolError::Unexpected("expected Hello to open the connection").into());
    };
    let version = match protocol::check_hello(&magic, version) {
        Ok(v) => v,
        Err(e) => {
            if magic == protocol::MAGIC {
                refuse(fr.get_mut(), &e.to_string()).await;
            }
            return Err(e.into());
        }
    };
    let server_nonce = protocol::nonce();
    let challenge = Message::Challenge {
        version,
        server_nonce,
        server_proof: protocol::proof(secret, "server", &client_nonce, &server_nonce),
    };
    write_message(fr.get_mut(), &challenge).await?;
    let reply = fr.read().await?.ok_or(ProtocolError::Auth(
        "the client hung up after the challenge (a different cluster secret?)",
    ))?;
    let Message::Auth { client_proof } = reply else {
        refuse(fr.get_mut(), "expected Auth").await;
        return Err(ProtocolError::Unexpected("expected Auth after the challenge").into());
    };
    if let Err(e) = protocol::verify_proof(
        secret,
        "client",
        &server_nonce,
        &client_nonce,
        &client_proof,
    ) {
        refuse(fr.get_mut(), "authentication failed").await;
        return Err(e.into());
    }
    Ok(Accepted { purpose })
}

/// Tells the peer why it is being disconnected; best effort (it may be gone already).
pub async fn refuse<W: AsyncWrite + Unpin>(w: &mut W, reason: &str) {
    let msg = Message::Refused {
        reason: reason.to_owned(),
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write_message(w, &msg)).await;
}

/// What the client learnt from a successful handshake.
#[derive(Debug, Clone)]
pub struct Welcomed {
    /// The server's node name.
    pub node: String,
    /// The server's epoch.
    pub epoch: u64,
    /// "primary" or "replica".
    pub role: String,
}

/// The client's half of the handshake. Verifies the server's proof before proving itself,
/// so a server that does not know the secret learns nothing useful.
pub async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    fr: &mut FrameReader<S>,
    secret: &[u8],
    purpose: Purpose,
) -> Result<Welcomed, ConnError> {
    let client_nonce: [u8; NONCE_LEN] = protocol::nonce();
    let hello = Message::Hello {
        magic: protocol::MAGIC,
        version: protocol::VERSION,
        client_nonce,
        purpose,
    };
    write_message(fr.get_mut(), &hello).await?;
    let (server_nonce, server_proof) = match fr.expect().await? {
        Message::Challenge {
            server_nonce,
            server_proof,
            ..
        } => (server_nonce, server_proof),
        Message::Refused { reason } => return Err(ConnError::Refused(reason)),
        _ => return Err(ProtocolError::Unexpected("expected Challenge").into()),
    };
    protocol::verify_proof(
        secret,
        "server",
        &client_nonce,
        &server_nonce,
        &server_proof,
    )
    .map_err(|_| ProtocolError::Auth("the storage server does not know the cluster secret"))?;
    let auth = Message::Auth {
        client_proof: protocol::proof(secret, "client", &server_nonce, &client_nonce),
    };
    write_message(fr.get_mut(), &auth).await?;
    match fr.expect().await? {
        Message::Welcome { node, epoch, role } => Ok(Welcomed { node, epoch, role }),
        Message::Refused { reason } => Err(ConnError::Refused(reason)),
        _ => Err(ProtocolError::Unexpected("expected Welcome").into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn handshake_succeeds_with_the_same_secret_only() {
        for (server_secret, ok) in [
            (&b"0123456789abcdef"[..], true),
            (b"wrong-secret-xyz", false),
        ] {
            let (a, b) = tokio::io::duplex(4096);
            let server = tokio::spawn(async move {
                let mut fr = FrameReader::new(b, 1 << 20, Duration::from_secs(5));
                let r = server_handshake(&mut fr, server_secret).await;
                if r.is_ok() {
                    let welcome = Message::Welcome {
                        node: "n".into(),
                        epoch: 1,
                        role: "primary".into(),
                    };
                    write_message(fr.get_mut(), &welcome).await.unwrap();
                }
                r.map(|a| a.purpose)
            });
            let mut fr = FrameReader::new(a, 1 << 20, Duration::from_secs(5));
            let client = client_handshake(&mut fr, b"0123456789abcdef", Purpose::Client).await;
            drop(fr);
            let server = server.await.unwrap();
            assert_eq!(client.is_ok(), ok, "{client:?}");
            assert_eq!(server.is_ok(), ok, "{server:?}");
        }
    }

    #[tokio::test]
    async fn a_stalled_frame_times_out_and_a_truncated_one_is_reported() {
        let (mut a, b) = tokio::io::duplex(4096);
        let mut fr = FrameReader::new(b, 1 << 20, Duration::from_millis(100));
        a.write_all(&[0, 0, 0, 50, 1, 2]).await.unwrap();
        let r = fr.read().await;
        assert!(matches!(r, Err(ConnError::Stalled(_))), "{r:?}");

        let (mut a, b) = tokio::io::duplex(4096);
        let mut fr = FrameReader::new(b, 1 << 20, Duration::from_secs(10));
        a.write_all(&[0, 0, 0, 50, 1, 2]).await.unwrap();
        drop(a);
        assert!(matches!(fr.read().await, Err(ConnError::Truncated(6))));
    }
}
