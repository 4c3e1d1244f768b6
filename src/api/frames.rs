//! The content service's streamed messages, framed and deframed without tonic's per-stream
//! buffers: Read responses out, Write requests in.
//!
//! Read. tonic encodes every response message into its own buffer: each byte a client reads
//! would be copied out of the stored chunk into a per-stream buffer that grows to the message
//! size and stays that large for the stream's life (measured with heaptrack under 64
//! concurrent streams: 36 MiB of such buffers at the heap peak, and one memory pass over every
//! byte served). Here a Read response's few bytes of gRPC and protobuf framing are written on
//! their own and the stored chunk follows as its own body frame, the same buffer RocksDB read
//! it into (so a chunk stays pinned until the transport has sent it, where the copy let it go
//! at once: the peak is about the same, the copy and its CPU are gone).
//!
//! Write. tonic's decoder reserves a whole message's size on top of the bytes it already holds
//! of it, and its buffer doubles when the last message's bytes are gone: a stream of 1 MiB
//! Write messages keeps a 4 MiB buffer for its life (heaptrack, 16 writers among 64 streams:
//! 33.7 MiB of them at the heap peak). Here each request message is gathered into a buffer of
//! exactly its size, or sliced out of the body frame that holds it whole, and the decoded
//! `data` is a slice of that buffer, so a stream holds the message it is on and nothing more.
//!
//! Only the framing lives here. The requests still go through `Content::read` and the
//! service's Write session (scope, digest, errors, metrics), and every other method, and any
//! call whose request is compressed, goes to tonic's generated server unchanged.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use http_body::Frame;
use http_body_util::{BodyExt, Limited};
use prost::Message;
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;
use tonic::{Code, Status};

use super::content::ContentService;
use super::pb::containerd::services::content::v1 as pb;
use pb::content_server::{Content, ContentServer};

const READ_PATH: &str = "/containerd.services.content.v1.Content/Read";
const WRITE_PATH: &str = "/containerd.services.content.v1.Content/Write";

/// Largest Read request accepted (a digest, an offset, a size: well under 1 KiB).
const REQUEST_MAX: usize = 16 << 10;

/// Data up to this size is copied in beside its framing, one body frame instead of two.
const INLINE_MAX: usize = 16 << 10;

/// The gRPC message prefix: a compression flag and a big-endian length.
const PREFIX: usize = 5;

/// The content service: Read framed here, everything else by tonic.
#[derive(Clone)]
pub struct ContentRoutes {
    svc: std::sync::Arc<ContentService>,
    generated: ContentServer<ContentService>,
    /// The largest request message decoded here (`max_message_bytes`).
    limit: usize,
}

impl ContentRoutes {
    /// `limit` bounds messages in both directions on the generated server, as before.
    pub fn new(svc: ContentService, limit: usize) -> ContentRoutes {
        let svc = std::sync::Arc::new(svc);
        ContentRoutes {
            generated: ContentServer::from_arc(svc.clone())
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            svc,
            limit,
        }
    }
}

impl NamedService for ContentRoutes {
    const NAME: &'static str = <ContentServer<ContentService> as NamedService>::NAME;
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<B> tower::Service<http::Request<B>> for ContentRoutes
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        tower::Service::<http::Request<B>>::poll_ready(&mut self.generated, cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let svc = self.svc.clone();
        match req.uri().path() {
            READ_PATH if uncompressed(req.headers()) => {
                Box::pin(async move { Ok(read(&svc, req).await) })
            }
            WRITE_PATH if uncompressed(req.headers()) => {
                let limit = self.limit;
                Box::pin(async move { Ok(write(&svc, req, limit).await) })
            }
            _ => Box::pin(self.generated.call(req)),
        }
    }
}

/// Whether the request message is sent as is (tonic answers a compressed one: the service
/// does not accept compression, and says so in tonic's words).
fn uncompressed(headers: &http::HeaderMap) -> bool {
    headers
        .get("grpc-encoding")
        .is_none_or(|v| v.as_bytes() == b"identity")
}

async fn read<B>(svc: &ContentService, req: http::Request<B>) -> http::Response<tonic::body::Body>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError> + Send + 'static,
{
    let (parts, body) = req.into_parts();
    let msg = match request_message(body).await {
        Ok(m) => m,
        Err(s) => return s.into_http(),
    };
    match svc.read(grpc_request(parts, msg)).await {
        Err(s) => s.into_http(),
        Ok(resp) => {
            let (meta, stream, _) = resp.into_parts();
            respond(meta, stream)
        }
    }
}

async fn write<B>(
    svc: &ContentService,
    req: http::Request<B>,
    limit: usize,
) -> http::Response<tonic::body::Body>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError> + Send + 'static,
{
    let (parts, body) = req.into_parts();
    let inbound = Requests::<B, pb::WriteContentRequest>::new(body, limit, "Write");
    match svc.write_stream(grpc_request(parts, inbound)).await {
        Err(s) => s.into_http(),
        Ok(stream) => respond(MetadataMap::new(), stream),
    }
}

/// The service's request: the call's metadata and extensions around `message`.
fn grpc_request<T>(parts: http::request::Parts, message: T) -> tonic::Request<T> {
    tonic::Request::from_parts(
        MetadataMap::from_headers(parts.headers),
        parts.extensions,
        message,
    )
}

/// A streamed response: headers now, then the messages, then the status as trailers.
fn respond<M: Framed>(
    meta: MetadataMap,
    stream: Pin<Box<dyn Stream<Item = Result<M, Status>> + Send>>,
) -> http::Response<tonic::body::Body> {
    let mut out = http::Response::new(tonic::body::Body::new(Messages {
        stream,
        data: None,
        done: false,
    }));
    *out.headers_mut() = meta.into_headers();
    out.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    out
}

/// The request messages of a client-streaming call, decoded from its body: each one gathered
/// into a buffer of exactly its size, or sliced out of the body frame that holds it whole.
struct Requests<B, M> {
    body: Pin<Box<B>>,
    /// The largest message accepted.
    limit: usize,
    /// The method, for error messages.
    method: &'static str,
    /// Received bytes not yet in a message: what the last frame held past the message it ended.
    rest: Bytes,
    /// The message being gathered: its length, and its bytes so far.
    partial: Option<(usize, BytesMut)>,
    done: bool,
    _message: std::marker::PhantomData<fn() -> M>,
}

impl<B, M> Requests<B, M> {
    fn new(body: B, limit: usize, method: &'static str) -> Self {
        Requests {
            body: Box::pin(body),
            limit,
            method,
            rest: Bytes::new(),
            partial: None,
            done: false,
            _message: std::marker::PhantomData,
        }
    }
}

impl<B, M: Message + Default> Requests<B, M> {
    /// The next whole message in what has arrived, if there is one.
    fn next_message(&mut self) -> Result<Option<M>, Status> {
        if self.partial.is_none() {
            let Some(head) = self.rest.get(..PREFIX) else {
                return Ok(None);
            };
            if head[0] != 0 {
                return Err(Status::internal(
                    "compressed request message without a grpc-encoding header",
                ));
            }
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            if len > self.limit {
                return Err(Status::resource_exhausted(format!(
                    "{} request message of {len} bytes: the limit is {} bytes (max_message_bytes)",
                    self.method, self.limit
                )));
            }
            self.rest.advance(PREFIX);
            if self.rest.len() >= len {
                let m = self.rest.split_to(len);
                return self.decode(m).map(Some);
            }
            // Capacity is only address space until bytes arrive (the allocator maps large
            // buffers lazily), and `limit` bounds it.
            self.partial = Some((len, BytesMut::with_capacity(len)));
        }
        let Some((len, buf)) = self.partial.as_mut() else {
            return Ok(None);
        };
        let n = (*len - buf.len()).min(self.rest.len());
        buf.extend_from_slice(&self.rest[..n]);
        self.rest.advance(n);
        if buf.len() < *len {
            return Ok(None);
        }
        let Some((_, buf)) = self.partial.take() else {
            return Ok(None);
        };
        self.decode(buf.freeze()).map(Some)
    }

    fn decode(&self, m: Bytes) -> Result<M, Status> {
        M::decode(m).map_err(|e| {
            Status::internal(format!("decoding a {} request message: {e}", self.method))
        })
    }
}

impl<B, M> Stream for Requests<B, M>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
    M: Message + Default,
{
    type Item = Result<M, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match this.next_message() {
                Ok(Some(m)) => return Poll::Ready(Some(Ok(m))),
                Ok(None) => {}
                Err(e) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            match futures::ready!(this.body.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if this.rest.is_empty() {
                        this.rest = data;
                    } else {
                        // Only a message header split across frames leaves bytes here (a
                        // frame's last bytes go into the message they belong to).
                        let mut b = BytesMut::with_capacity(this.rest.len() + data.len());
                        b.extend_from_slice(&this.rest);
                        b.extend_from_slice(&data);
                        this.rest = b.freeze();
                    }
                }
                Some(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(Status::from_error(e.into()))));
                }
                None => {
                    this.done = true;
                    if this.partial.is_some() || !this.rest.is_empty() {
                        return Poll::Ready(Some(Err(Status::internal(format!(
                            "the {} request stream ended inside a message",
                            this.method
                        )))));
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }
}

/// The one request message of a unary-request call, its size bounded before it is buffered.
async fn request_message<B>(body: B) -> Result<pb::ReadContentRequest, Status>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError> + Send + 'static,
{
    let bytes = Limited::new(body, PREFIX + REQUEST_MAX)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                Status::resource_exhausted(format!("Read request larger than {REQUEST_MAX} bytes"))
            } else {
                Status::cancelled(format!("reading the Read request: {e}"))
            }
        })?
        .to_bytes();
    let Some(head) = bytes.get(..PREFIX) else {
        return Err(Status::internal("missing request message"));
    };
    if head[0] != 0 {
        return Err(Status::internal(
            "compressed request message without a grpc-encoding header",
        ));
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if bytes.len() - PREFIX != len {
        return Err(Status::internal(format!(
            "request message of {len} bytes, {} sent: a unary request carries exactly one",
            bytes.len() - PREFIX
        )));
    }
    pb::ReadContentRequest::decode(bytes.slice(PREFIX..))
        .map_err(|e| Status::internal(format!("decoding the Read request: {e}")))
}

/// Response messages as body frames: each message's framing, then its data (if it has data
/// worth a frame of its own), then the status as trailers.
struct Messages<M> {
    stream: Pin<Box<dyn Stream<Item = Result<M, Status>> + Send>>,
    /// The data that follows the framing just sent.
    data: Option<Bytes>,
    done: bool,
}

impl<M: Framed> http_body::Body for Messages<M> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        let end = match futures::ready!(self.stream.poll_next_unpin(cx)) {
            Some(Ok(m)) => {
                let (head, data) = m.frame()?;
                self.data = data;
                return Poll::Ready(Some(Ok(Frame::data(head))));
            }
            Some(Err(s)) => s,
            None => Status::new(Code::Ok, ""),
        };
        self.done = true;
        let mut trailers = http::HeaderMap::new();
        end.add_header(&mut trailers)?;
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.data.is_none()
    }
}

/// A response message as gRPC body bytes: its framing (with the whole message, or with all
/// but a large payload), and the payload to send after it.
trait Framed: Send + 'static {
    fn frame(self) -> Result<(Bytes, Option<Bytes>), Status>;
}

impl Framed for pb::WriteContentResponse {
    fn frame(self) -> Result<(Bytes, Option<Bytes>), Status> {
        let mut b = BytesMut::with_capacity(PREFIX + self.encoded_len());
        b.put_u8(0);
        b.put_u32(self.encoded_len() as u32);
        self.encode(&mut b)
            .map_err(|e| Status::internal(format!("encoding a Write response: {e}")))?;
        Ok((b.freeze(), None))
    }
}

/// Fields are encoded by prost, `data` last and by hand: protobuf readers accept fields in
/// any order, so `data` can follow as its own buffer.
impl Framed for pb::ReadContentResponse {
    fn frame(self) -> Result<(Bytes, Option<Bytes>), Status> {
        let data = self.data;
        let rest = pb::ReadContentResponse {
            data: Bytes::new(),
            ..self
        };
        let mut head = BytesMut::with_capacity(PREFIX + 24 + data.len().min(INLINE_MAX));
        head.put_bytes(0, PREFIX);
        rest.encode(&mut head)
            .map_err(|e| Status::internal(format!("encoding a Read response: {e}")))?;
        if !data.is_empty() {
            prost::encoding::encode_key(2, prost::encoding::WireType::LengthDelimited, &mut head);
            prost::encoding::encode_varint(data.len() as u64, &mut head);
        }
        let len = u32::try_from(head.len() - PREFIX + data.len())
            .map_err(|_| Status::internal("a Read response message over 4 GiB"))?;
        head[1..PREFIX].copy_from_slice(&len.to_be_bytes());
        if data.len() <= INLINE_MAX {
            head.extend_from_slice(&data);
            return Ok((head.freeze(), None));
        }
        Ok((head.freeze(), Some(data)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The framed bytes of a message are exactly what tonic's prost codec sends.
    #[test]
    fn frames_match_the_generated_encoding() {
        for (offset, len) in [(0, 0), (0, 5), (7, INLINE_MAX), (1 << 40, INLINE_MAX + 1)] {
            let data: Bytes = (0..len).map(|i| (i % 251) as u8).collect::<Vec<_>>().into();
            let m = pb::ReadContentResponse { offset, data };
            let mut want = vec![0u8; PREFIX];
            m.encode(&mut want).unwrap();
            let n = (want.len() - PREFIX) as u32;
            want[1..PREFIX].copy_from_slice(&n.to_be_bytes());

            let (head, rest) = m.clone().frame().unwrap();
            assert_eq!(rest.is_some(), len > INLINE_MAX);
            let mut got = head.to_vec();
            got.extend_from_slice(&rest.unwrap_or_default());
            assert_eq!(got, want, "offset {offset}, {len} bytes");
            assert_eq!(pb::ReadContentResponse::decode(&got[PREFIX..]).unwrap(), m);
        }
    }

    use proptest::prelude::*;

    fn encoded(m: &pb::WriteContentRequest) -> Vec<u8> {
        let mut b = vec![0u8];
        b.extend_from_slice(&(m.encoded_len() as u32).to_be_bytes());
        m.encode(&mut b).unwrap();
        b
    }

    fn request(i: usize, len: usize) -> pb::WriteContentRequest {
        pb::WriteContentRequest {
            action: 1,
            r#ref: format!("ref-{i}"),
            offset: i as i64,
            data: (0..len)
                .map(|j| (j * 7 + i) as u8)
                .collect::<Vec<_>>()
                .into(),
            ..Default::default()
        }
    }

    type Body = http_body_util::StreamBody<
        futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::io::Error>>>,
    >;

    /// A body of `bytes` cut at `cuts`, ending with `end` after the frames.
    fn body(bytes: &[u8], cuts: &[usize], end: Option<std::io::Error>) -> Body {
        let mut at: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        at.extend([0, bytes.len()]);
        at.sort_unstable();
        let mut frames: Vec<Result<Frame<Bytes>, std::io::Error>> = at
            .windows(2)
            .map(|w| Ok(Frame::data(Bytes::copy_from_slice(&bytes[w[0]..w[1]]))))
            .collect();
        frames.extend(end.map(Err));
        http_body_util::StreamBody::new(futures::stream::iter(frames))
    }

    fn decode_all(b: Body, limit: usize) -> Vec<Result<pb::WriteContentRequest, Status>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(Requests::<_, pb::WriteContentRequest>::new(b, limit, "Write").collect())
    }

    proptest! {
        /// However the client's frames cut the stream (headers split, several messages in
        /// one frame, empty frames), the same messages come out, in order.
        #[test]
        fn any_framing_yields_the_messages_sent(
            lens in proptest::collection::vec(0usize..3000, 0..8),
            cuts in proptest::collection::vec(0usize..30_000, 0..40),
        ) {
            let sent: Vec<_> = lens.iter().enumerate().map(|(i, n)| request(i, *n)).collect();
            let bytes: Vec<u8> = sent.iter().flat_map(encoded).collect();
            let got: Vec<_> = decode_all(body(&bytes, &cuts, None), 1 << 20)
                .into_iter()
                .map(|r| r.unwrap())
                .collect();
            prop_assert_eq!(got, sent);
        }
    }

    #[test]
    fn a_message_held_by_one_frame_is_not_copied() {
        let bytes = encoded(&request(0, 100_000));
        let frame = Bytes::from(bytes);
        let range = frame.as_ptr_range();
        let b =
            http_body_util::StreamBody::new(futures::stream::iter(vec![Ok::<_, std::io::Error>(
                Frame::data(frame.clone()),
            )]));
        let got = decode_all(b, 1 << 20).pop().unwrap().unwrap();
        assert!(range.contains(&got.data.as_ptr()));
    }

    #[test]
    fn bad_streams_are_refused_by_name() {
        // Larger than the limit: refused from its header, before its bytes are buffered.
        let big = encoded(&request(0, 5000));
        let got = decode_all(body(&big[..PREFIX], &[], None), 4096);
        let e = got[0].as_ref().unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted);
        assert!(e.message().contains("max_message_bytes"), "{e}");
        assert_eq!(got.len(), 1);

        // Ended inside a message, or inside a header.
        for cut in [PREFIX + 10, 3] {
            let got = decode_all(body(&big[..cut], &[1], None), 1 << 20);
            let e = got.last().unwrap().as_ref().unwrap_err();
            assert_eq!(e.code(), Code::Internal);
            assert!(e.message().contains("ended inside a message"), "{e}");
        }

        // Compressed without saying how.
        let mut z = encoded(&request(0, 10));
        z[0] = 1;
        let e = decode_all(body(&z, &[], None), 1 << 20)
            .remove(0)
            .unwrap_err();
        assert!(e.message().contains("compressed"), "{e}");

        // Not protobuf.
        let mut junk = vec![0u8, 0, 0, 0, 3];
        junk.extend([0xff, 0xff, 0xff]);
        let e = decode_all(body(&junk, &[], None), 1 << 20)
            .remove(0)
            .unwrap_err();
        assert!(e.message().contains("decoding a Write request"), "{e}");

        // The transport failed: the messages before it, then its error, then nothing.
        let two: Vec<u8> = [request(0, 10), request(1, 10)]
            .iter()
            .flat_map(encoded)
            .collect();
        let got = decode_all(
            body(&two, &[], Some(std::io::Error::other("reset"))),
            1 << 20,
        );
        assert_eq!(got.len(), 3);
        assert!(got[1].is_ok() && got[2].is_err());
    }
}
