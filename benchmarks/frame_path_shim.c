/* A C shim over libucp for benchmarks/frame_path_proto.py: tag sends and receives of an
 * IOV (several buffers as one message) posted on ucxx's own worker and endpoints, with
 * completion recorded in a caller-owned op struct that Python polls (no Python objects
 * per request). Single-threaded: call only from the thread that progresses the worker. */
#include <stdint.h>
#include <string.h>
#include <ucp/api/ucp.h>

#define SM_MAX_IOV 64

typedef struct {
    int32_t state;      /* 0 pending, 1 done */
    int32_t status;     /* ucs_status_t once done */
    uint64_t length;    /* bytes received */
    void *req;          /* the UCX request while pending */
    ucp_dt_iov_t iov[SM_MAX_IOV];
} sm_op_t;

size_t sm_op_size(void) { return sizeof(sm_op_t); }

static void send_cb(void *req, ucs_status_t st, void *ud) {
    sm_op_t *op = ud;
    op->status = st; op->req = NULL; op->state = 1;
    ucp_request_free(req);
}

static void recv_cb(void *req, ucs_status_t st, const ucp_tag_recv_info_t *info, void *ud) {
    sm_op_t *op = ud;
    if (st == UCS_OK) op->length = info->length;
    op->status = st; op->req = NULL; op->state = 1;
    ucp_request_free(req);
}

static void finish(sm_op_t *op, ucs_status_ptr_t p) {
    if (p == NULL) { op->status = UCS_OK; op->state = 1; }
    else if (UCS_PTR_IS_ERR(p)) { op->status = UCS_PTR_STATUS(p); op->state = 1; }
    else if (op->state == 0) op->req = p;   /* callback not run yet */
}

int sm_tag_send(void *ep, uint64_t tag, const uint64_t *ptrs, const uint64_t *lens, int n, sm_op_t *op) {
    if (n < 1 || n > SM_MAX_IOV) return -1;
    ucp_request_param_t p;
    memset(&p, 0, sizeof p);
    op->state = 0; op->status = 0; op->length = 0; op->req = NULL;
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.cb.send = send_cb; p.user_data = op;
    ucs_status_ptr_t r;
    if (n == 1) {
        r = ucp_tag_send_nbx((ucp_ep_h)ep, (void *)ptrs[0], lens[0], tag, &p);
    } else {
        for (int i = 0; i < n; i++) { op->iov[i].buffer = (void *)ptrs[i]; op->iov[i].length = lens[i]; }
        p.op_attr_mask |= UCP_OP_ATTR_FIELD_DATATYPE; p.datatype = ucp_dt_make_iov();
        r = ucp_tag_send_nbx((ucp_ep_h)ep, op->iov, n, tag, &p);
    }
    finish(op, r);
    return 0;
}

int sm_tag_recv(void *worker, uint64_t tag, uint64_t mask, const uint64_t *ptrs, const uint64_t *lens, int n, sm_op_t *op) {
    if (n < 1 || n > SM_MAX_IOV) return -1;
    ucp_request_param_t p;
    ucp_tag_recv_info_t info;
    memset(&p, 0, sizeof p);
    op->state = 0; op->status = 0; op->length = 0; op->req = NULL;
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_RECV_INFO;
    p.cb.recv = recv_cb; p.user_data = op; p.recv_info.tag_info = &info;
    ucs_status_ptr_t r;
    if (n == 1) {
        r = ucp_tag_recv_nbx((ucp_worker_h)worker, (void *)ptrs[0], lens[0], tag, mask, &p);
    } else {
        for (int i = 0; i < n; i++) { op->iov[i].buffer = (void *)ptrs[i]; op->iov[i].length = lens[i]; }
        p.op_attr_mask |= UCP_OP_ATTR_FIELD_DATATYPE; p.datatype = ucp_dt_make_iov();
        r = ucp_tag_recv_nbx((ucp_worker_h)worker, op->iov, n, tag, mask, &p);
    }
    if (r == NULL) op->length = info.length;
    finish(op, r);
    return 0;
}

void sm_cancel(void *worker, sm_op_t *op) {
    if (op->state == 0 && op->req != NULL) ucp_request_cancel((ucp_worker_h)worker, op->req);
}
